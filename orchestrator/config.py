"""Typed configuration: dataclasses loaded from YAML with ``--config`` and dotted command-line overrides.

Parsing is jsonargparse's (what LightningCLI users know): unknown keys and wrong types are rejected by the parser;
:func:`validate` then checks values and cross-field rules before any work starts. Every error is a
:class:`ConfigError` with one line that names the key.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


@dataclass
class DataConfig:
    """Where the images come from and how they are split among clients."""

    dataset: Literal["cifar10", "cifar100", "fmnist", "mnist", "npz", "synthetic"] = "cifar100"
    root: str = "data"  #: directory of torchvision datasets (downloaded there when reachable)
    download: bool = True
    path: Optional[str] = None  #: the .npz file for ``dataset: npz``
    partition: Literal["shards", "dirichlet", "iid"] = "shards"
    num_clients: int = 100
    shards_per_client: int = 100  #: s, for ``partition: shards``
    alpha: float = 0.5  #: Dirichlet concentration, for ``partition: dirichlet``
    augment: bool = True  #: the paper's RandomCrop(32, pad 4) + horizontal flip on training batches
    synthetic: dict = field(default_factory=dict)  #: options of the synthetic source (num_classes, train_per_class, ...)


@dataclass
class ModelConfig:
    name: str = "mobilenet"  #: a registered model: mobilenet, cnn4, resnet18
    num_classes: Optional[int] = None  #: default: the dataset's class count (a different value is an error)
    options: dict = field(default_factory=dict)  #: model constructor options, e.g. track_running_stats


@dataclass
class AlgorithmConfig:
    name: str = "mhmd"  #: fedavg, fedbabu, fedper, mhmd, mhmd_* ablations (see orchestrator/algorithms)
    loss: Optional[str] = None  #: loss preset; default: the algorithm's (mhmd -> mhmd, others -> ce)
    loss_options: dict = field(default_factory=dict)  #: LossConfig field overrides, e.g. {reduction: batchmean}
    options: dict = field(default_factory=dict)  #: algorithm-specific options


@dataclass
class FederationConfig:
    rounds: int = 320  #: R communication rounds
    client_fraction: float = 0.1  #: f; m = max(1, int(f * N)) clients per round
    local_epochs: int = 1  #: tau
    batch_size: int = 50
    lr: float = 0.1
    head_lr: Optional[float] = None  #: default: lr (only used where the algorithm trains heads)
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_gamma: float = 0.1  #: lr multiplied by this after each milestone
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  #: fractions of R
    eval_every: int = 8  #: evaluate every k rounds (and after the last round)
    eval_batch_size: int = 500
    select: Literal["best", "final"] = "best"  #: model handed to personalisation (best = best-on-test, the paper's)


@dataclass
class PersonalizationConfig:
    enabled: bool = True
    epochs: int = 5  #: E; accuracy is recorded after every epoch 0..E
    lr: float = 0.001
    part: Literal["body", "head", "full"] = "full"
    loss: Optional[str] = None  #: default: the algorithm's local loss
    batch_size: Optional[int] = None  #: default: federation.batch_size


@dataclass
class TrackingConfig:
    wandb: Optional[Literal["online", "offline", "disabled"]] = None  #: default: $WANDB_MODE, else disabled
    project: str = "fl-sd"
    entity: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    progress: Optional[bool] = None  #: progress bar; default: on in a terminal, off in CI
    plots: bool = True


@dataclass
class CheckpointConfig:
    every: int = 8  #: checkpoint every k rounds (and at the end); 0 = only at the end


@dataclass
class Config:
    seed: int = 1
    name: Optional[str] = None  #: run name; default: derived from dataset, algorithm, s, f, tau, seed
    run_dir: Optional[str] = None  #: default: runs/<name>
    device: str = "auto"  #: auto (cuda when present), cpu, cuda, cuda:N
    backend: Literal["inprocess", "flower"] = "inprocess"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    flower: dict = field(default_factory=dict)  #: Flower backend options (client resources, ...)

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def clients_per_round(self) -> int:
        return max(1, int(self.federation.client_fraction * self.data.num_clients))

    def default_name(self) -> str:
        d, f = self.data, self.federation
        split = {"shards": f"s{d.shards_per_client}", "dirichlet": f"dir{d.alpha:g}", "iid": "iid"}[d.partition]
        return (f"{d.dataset}-{self.model.name}-{self.algorithm.name}-{split}-f{f.client_fraction:g}"
                f"-tau{f.local_epochs}-R{f.rounds}-seed{self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="python orchestrator/main.py", exit_on_error=False,
                            description="fl-sd: federated MHMD / FedBABU / FedAvg ... Options after --config override it.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--resume", type=Optional[str], default=None, help="continue the run in this directory")
    parser.add_class_arguments(Config)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, Optional[str]]:
    """Parse ``--config FILE`` plus dotted overrides into a validated :class:`Config` (and the --resume dir)."""
    from jsonargparse import ArgumentError

    parser = _parser()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ns = parser.parse_args(argv)
            resume = ns.pop("resume", None)
            ns.pop("config", None)
            cfg = parser.instantiate(ns)
    except ArgumentError as err:
        message = _one_line(str(err))
        files = [argv[i + 1] for i, a in enumerate(argv or []) if a == "--config" and i + 1 < len(argv)]
        if files and "parsing config" in message:
            message = f"{files[-1]} is not a valid YAML config ({message}); fix the file's syntax"
        raise ConfigError(message) from None
    cfg = Config(**{k: getattr(cfg, k) for k in Config.__dataclass_fields__})
    validate(cfg)
    return cfg, resume


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A validated Config from a YAML file plus ``["--federation.rounds", "4", ...]`` overrides."""
    cfg, _ = parse_args(["--config", str(path), *(overrides or [])])
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a run directory's config.yaml)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(data, fh)
    try:
        return load_config(fh.name)
    finally:
        os.unlink(fh.name)


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    text = text.replace("Parser key ", "config key ").replace("Group ", "config section ")
    if "unrecognized arguments" in text:
        text += " (check the key's spelling: python orchestrator/main.py --help lists every key)"
    return text


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}: {message}")


def validate(cfg: Config) -> None:
    """Check values and cross-field rules; raise ConfigError naming the key. Cheap: no data is read."""
    from fl_sd.losses import PRESETS, LossConfig
    from fl_sd.models import list_models

    from .algorithms import list_algorithms

    d, m, a, f, p = cfg.data, cfg.model, cfg.algorithm, cfg.federation, cfg.personalization
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _check(d.num_clients >= 1, "data.num_clients", f"must be >= 1, got {d.num_clients}")
    _check(d.shards_per_client >= 1, "data.shards_per_client", f"must be >= 1, got {d.shards_per_client}")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(d.dataset != "npz" or bool(d.path), "data.path", "dataset npz needs data.path: the .npz file to read")
    _check(m.name in list_models(), "model.name", f"unknown model {m.name!r}; choose one of {list_models()}")
    _check(m.num_classes is None or m.num_classes >= 2, "model.num_classes", f"must be >= 2, got {m.num_classes}")
    _check("num_classes" not in m.options, "model.options.num_classes", "set model.num_classes instead")
    _check(a.name in list_algorithms(), "algorithm.name",
           f"unknown algorithm {a.name!r}; choose one of {list_algorithms()}")
    for key, preset in (("algorithm.loss", a.loss), ("personalization.loss", p.loss)):
        _check(preset is None or preset in PRESETS, key, f"unknown loss preset {preset!r}; choose one of {sorted(PRESETS)}")
    bad = sorted(set(a.loss_options) - set(LossConfig.__dataclass_fields__))
    _check(not bad, "algorithm.loss_options", f"unknown option(s) {bad}; valid: {sorted(LossConfig.__dataclass_fields__)}")
    _check(f.rounds >= 1, "federation.rounds", f"must be >= 1, got {f.rounds}")
    _check(0 < f.client_fraction <= 1, "federation.client_fraction", f"must be in (0, 1], got {f.client_fraction}")
    _check(f.local_epochs >= 1, "federation.local_epochs", f"must be >= 1, got {f.local_epochs}")
    _check(f.batch_size >= 1, "federation.batch_size", f"must be >= 1, got {f.batch_size}")
    _check(f.lr > 0, "federation.lr", f"must be > 0, got {f.lr}")
    _check(f.head_lr is None or f.head_lr >= 0, "federation.head_lr", f"must be >= 0, got {f.head_lr}")
    _check(0 <= f.momentum < 1, "federation.momentum", f"must be in [0, 1), got {f.momentum}")
    _check(f.weight_decay >= 0, "federation.weight_decay", f"must be >= 0, got {f.weight_decay}")
    _check(0 < f.lr_gamma <= 1, "federation.lr_gamma", f"must be in (0, 1], got {f.lr_gamma}")
    _check(all(0 < x < 1 for x in f.lr_milestones), "federation.lr_milestones",
           f"must be fractions of the rounds in (0, 1), got {f.lr_milestones}")
    _check(f.eval_every >= 1, "federation.eval_every", f"must be >= 1, got {f.eval_every}")
    _check(f.eval_batch_size >= 1, "federation.eval_batch_size", f"must be >= 1, got {f.eval_batch_size}")
    _check(p.epochs >= 0, "personalization.epochs", f"must be >= 0, got {p.epochs}")
    _check(p.lr >= 0, "personalization.lr", f"must be >= 0, got {p.lr}")
    _check(p.batch_size is None or p.batch_size >= 1, "personalization.batch_size", f"must be >= 1, got {p.batch_size}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    from .flower_backend import validate_flower_options  # no Flower import: the options only

    validate_flower_options(cfg.flower)
    from .algorithms import get_algorithm

    try:
        get_algorithm(a.name).validate_options(a.options)
    except ValueError as err:
        raise ConfigError(f"config key algorithm.options: {err}") from None

"""Typed configuration: dataclasses loaded from YAML with ``--config`` and dotted command-line overrides.

Parsing is jsonargparse's (what LightningCLI users know): unknown keys and wrong types are rejected by the parser;
:func:`validate` then checks values and cross-field rules before any work starts. Every error is a
:class:`~orchestrator.errors.ConfigError` with one line that names the key.

Sections that belong to one choice are typed too: ``data.synthetic`` (the synthetic source), ``algorithm.loss_options``
(:class:`~fl_sd.losses.LossConfig` overrides), ``flower`` (the Flower backend), and one section per algorithm with
options, ``algorithm.<name>`` (its ``Options`` dataclass, e.g. ``algorithm.ditto.lam``), built from the algorithm
registry when a config is parsed, so an algorithm defined in one file brings its options with it.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import sys
import tempfile
import typing
import warnings
from argparse import RawDescriptionHelpFormatter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, DefaultHelpFormatter

from fl_sd.losses import PRESETS, loss_config
from fl_sd.models import HEAD_LAYOUTS, list_models
from fl_sd.models.registry import model_entry

from .algorithms import AlgorithmOptions, get_algorithm, list_algorithms
from .errors import ConfigError, OptionError
from .fielddocs import describe
from .rundir import read_run_config


@describe
@dataclass
class SyntheticOptions:
    """The synthetic source's options (fl_sd.data.make_synthetic); used with ``data.dataset: synthetic`` only."""

    num_classes: int = 10  #: classes C
    train_per_class: int = 500  #: training images per class
    test_per_class: int = 100  #: test images per class
    image_size: int = 32  #: height = width in pixels
    channels: int = 3  #: colour channels
    seed: int = 0  #: seed of the images (independent of the run's seed)
    contrast: float = 64.0  #: amplitude of each class's pattern (higher: easier)
    clutter: float = 1.0  #: amplitude of the random background clutter, relative to the pattern
    noise: int = 48  #: amplitude of per-pixel uniform noise
    max_shift: int = 2  #: largest random translation of the pattern, in pixels


@describe
@dataclass
class DataConfig:
    """Where the images come from and how they are split among clients."""

    dataset: Literal["cifar10", "cifar100", "fmnist", "mnist", "npz", "synthetic"] = "cifar100"  #: the image source
    root: str = "data"  #: directory of torchvision datasets (downloaded there when reachable)
    download: bool = True  #: download a torchvision dataset into data.root when it is missing
    path: Optional[str] = None  #: the .npz file for ``dataset: npz``
    partition: Literal["shards", "dirichlet", "iid"] = "shards"  #: how the training data is split among clients
    num_clients: int = 100  #: N clients
    shards_per_client: int = 100  #: s, for ``partition: shards``
    alpha: float = 0.5  #: Dirichlet concentration, for ``partition: dirichlet``
    augment: bool = True  #: the paper's RandomCrop(32, pad 4) + horizontal flip on training batches
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)  #: the synthetic source's options


@describe
@dataclass
class ModelConfig:
    """The network: a registered multi-head model and its constructor options."""

    name: str = "mobilenet"  #: a registered model: mobilenet, cnn4, resnet18, resnet50
    num_classes: Optional[int] = None  #: default: the dataset's class count (a different value is an error)
    #: model constructor options, e.g. {width: 16}; one key: --model.options.width 16 (values read as YAML);
    #: head_layout (cnn4, resnet18, resnet50): fixed (default) or historic (the reference code's head placement and
    #: scalers: cnn4 all heads on conv0; resnet18 all on layer1 block 0, Linear(C,1) scalers with eps 0.1, 0.01,
    #: 0.001; resnet50 Linear(C,1) scalers + 0.5 on the aux heads and the final head)
    options: dict = field(default_factory=dict)


@describe
@dataclass
class LossOptions:
    """Overrides of the loss preset's fields (fl_sd.losses.LossConfig); null keeps the preset's / model's value."""

    aux_weight: Optional[float] = None  #: weight of the auxiliary heads' cross-entropy
    kd_weight: Optional[float] = None  #: weight of the distillation term
    temperature: Optional[float] = None  #: distillation temperature
    use_scaler: Optional[bool] = None  #: learned temperature scaler of the auxiliary heads
    direction: Optional[Literal["mutual", "self"]] = None  #: mutual (heads teach each other) or self distillation
    gating: Optional[Literal["correct", "batch", "none"]] = None  #: which teachers count: correct ones, batch, all
    reduction: Optional[Literal["mean", "batchmean"]] = None  #: reduction of the KL divergence
    detach_teacher: Optional[bool] = None  #: no gradient through the teacher's logits


@describe
@dataclass
class AlgorithmConfig:
    """The algorithm; ``algorithm.<name>.*`` (one section per algorithm with options) are added from the registry."""

    name: str = "mhmd"  #: a registered algorithm (listed at the end of --help; orchestrator/algorithms)
    loss: Optional[str] = None  #: loss preset; default: the algorithm's (mhmd -> mhmd, others -> ce)
    loss_options: LossOptions = field(default_factory=LossOptions)  #: overrides of the loss preset's fields


@describe
@dataclass
class FederationConfig:
    """The federated training: rounds, sampling, local SGD, learning-rate schedule, evaluation, model selection."""

    rounds: int = 320  #: R communication rounds
    client_fraction: float = 0.1  #: f; m = max(1, int(f * N)) clients per round
    local_epochs: int = 1  #: tau
    batch_size: int = 50  #: local batch size B
    lr: float = 0.1  #: local SGD learning rate (of the body; of everything when head_lr is null)
    head_lr: Optional[float] = None  #: default: lr (only used where the algorithm trains heads)
    momentum: float = 0.9  #: local SGD momentum
    weight_decay: float = 0.0  #: local SGD weight decay
    lr_gamma: float = 0.1  #: lr multiplied by this after each milestone
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  #: fractions of R
    eval_every: int = 8  #: evaluate every k rounds (and after the last round)
    eval_batch_size: int = 500  #: batch size of evaluations (no effect on the numbers)
    select: Literal["best", "final"] = "best"  #: model handed to personalisation (best = best-on-test, the paper's)
    #: divergence without NaN: a client's mean local loss above this stops the run (null: never); chance is ln(C)
    diverge_loss: Optional[float] = 1000.0
    #: divergence without NaN: a global weight with |w| above this stops the run (null: never)
    diverge_weight: Optional[float] = 1.0e6


@describe
@dataclass
class PersonalizationConfig:
    """Personalisation after training: every client fine-tunes the selected model on its own data."""

    enabled: bool = True  #: fine-tune every client after the last round
    epochs: int = 5  #: E; accuracy is recorded after every epoch 0..E
    lr: float = 0.001  #: fine-tuning learning rate
    part: Literal["body", "head", "full"] = "full"  #: the part of the model fine-tuned
    loss: Optional[str] = None  #: default: the algorithm's local loss
    batch_size: Optional[int] = None  #: default: federation.batch_size
    momentum: Optional[float] = None  #: default: federation.momentum (the paper fine-tunes at 0.9)


@describe
@dataclass
class TrackingConfig:
    """How a run is watched: Weights & Biases, the progress bar, plots (CSV/JSON files are always written)."""

    wandb: Optional[Literal["online", "offline", "disabled"]] = None  #: default: $WANDB_MODE, else disabled
    project: str = "fl-sd"  #: W&B project
    entity: Optional[str] = None  #: W&B entity (team or user); default: yours
    tags: list[str] = field(default_factory=list)  #: W&B tags
    group: Optional[str] = None  #: W&B run group (a sweep sets it to the cell, so W&B compares a cell's runs)
    job_type: Optional[str] = None  #: W&B job type (a sweep sets it to the algorithm's label)
    progress: Optional[bool] = None  #: progress bar; default: on in a terminal, off in CI
    plots: bool = True  #: write accuracy / fine-tuning plots (*.png) at the end


@describe
@dataclass
class CheckpointConfig:
    """When the whole federation is checkpointed (what --resume continues from)."""

    every: int = 8  #: checkpoint every k rounds (and at the end); 0 = only at the end


@describe
@dataclass
class FlowerConfig:
    """The Flower backends: Ray resources of each simulated client, cluster, timeouts (``backend: flower``); the
    timeouts and ``retry_after`` also apply to Flower's deployment runtime (``flwr run``, docs/flower.md)."""

    num_cpus: float = 1.0  #: CPUs per simulated client (Ray actor resources); also the client's torch threads
    num_gpus: float = 0.0  #: GPUs (a fraction shares one) per client; > 0 trains the clients on CUDA
    ray_address: Optional[str] = None  #: join a running Ray cluster ("auto", "HOST:6379"); null starts a local one
    ray_init_args: dict = field(default_factory=dict)  #: further ray.init() keyword arguments
    round_timeout: Optional[float] = None  #: seconds to wait for a round's replies; null waits as long as it takes
    startup_timeout: float = 300.0  #: seconds to wait for Ray, the actors and the Flower nodes to come up
    #: deployment runtime: seconds without a reply after which a client's job is sent again (to the SuperNode that
    #: now holds its partition); null: only when Flower reports the node unavailable (heartbeats missed)
    retry_after: Optional[float] = None
    verbose: bool = False  #: Flower's DEBUG logging


@describe
@dataclass
class BatchedConfig:
    """The batched engine (``backend: batched``): many clients trained and evaluated as one computation."""

    max_clients: int = 0  #: clients per batched computation (chunks sized to memory); 0 = a whole round / all clients
    #: torch.compile the batched step: off (eager) | default | reduce-overhead (CUDA graphs on a GPU) | max-autotune;
    #: compiled once per run (minutes on a CPU), then reused by every round
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"


@describe
@dataclass
class Config:
    """The run: its seed, name, where it is written, the device and the execution backend."""

    seed: int = 1  #: seed of the partition, client sampling, initialisation and batches
    name: Optional[str] = None  #: run name; default: derived from dataset, algorithm, s, f, tau, seed
    run_dir: Optional[str] = None  #: default: runs/<name>
    device: str = "auto"  #: auto (cuda when present), cpu, cuda, cuda:N
    #: inprocess = clients one after another; deployment: set by the Flower App's ServerApp (flwr run)
    backend: Literal["inprocess", "batched", "flower", "deployment"] = "inprocess"
    precision: Literal["32-true", "64-true", "bf16-mixed"] = "32-true"  #: Lightning's names; bf16-mixed = autocast
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    batched: BatchedConfig = field(default_factory=BatchedConfig)

    # -- derived ----------------------------------------------------------------------------------------------
    @property
    def clients_per_round(self) -> int:
        return max(1, int(self.federation.client_fraction * self.data.num_clients))

    def algorithm_options(self) -> AlgorithmOptions:
        """The selected algorithm's typed options (its ``algorithm.<name>`` section, else its defaults)."""
        options = getattr(self.algorithm, self.algorithm.name, None)
        return options if options is not None else get_algorithm(self.algorithm.name).Options()

    def loss_options(self) -> dict[str, Any]:
        """The ``algorithm.loss_options`` that are set (not null)."""
        return {k: v for k, v in asdict(self.algorithm.loss_options).items() if v is not None}

    def synthetic_options(self) -> dict[str, Any]:
        return asdict(self.data.synthetic)

    def default_name(self) -> str:
        """dataset (npz: the file's stem), model, algorithm, split, N, f, tau, R, lr, seed. Runs that differ elsewhere
        still share it: a new run refuses a directory that holds a different experiment and names the difference."""
        d, f = self.data, self.federation
        split = {"shards": f"s{d.shards_per_client}", "dirichlet": f"dir{d.alpha:g}", "iid": "iid"}[d.partition]
        dataset = f"npz_{Path(d.path).stem}" if d.dataset == "npz" and d.path else d.dataset
        return (f"{dataset}-{self.model.name}-{self.algorithm.name}-{split}-N{d.num_clients}-f{f.client_fraction:g}"
                f"-tau{f.local_epochs}-R{f.rounds}-lr{f.lr:g}-seed{self.seed}")

    def make_paths_absolute(self) -> None:
        """Store every path as an absolute one (run_dir too: runs/<name> when unset), so the run's config.yaml works
        from any working directory (``--resume`` from elsewhere, a sweep's workers)."""
        if self.name is None:
            self.name = self.default_name()
        self.run_dir = os.path.abspath(self.run_dir or os.path.join("runs", self.name))
        self.data.root = os.path.abspath(self.data.root)
        if self.data.path:
            self.data.path = os.path.abspath(self.data.path)
        options = self.algorithm_options()
        for key in options.path_fields:
            if getattr(options, key):
                setattr(options, key, os.path.abspath(getattr(options, key)))

    def absolute(self) -> "Config":
        """A copy with :meth:`make_paths_absolute` applied."""
        copy = dataclasses.replace(self, data=dataclasses.replace(self.data),
                                   algorithm=dataclasses.replace(self.algorithm))
        name = self.algorithm.name
        if isinstance(getattr(self.algorithm, name, None), AlgorithmOptions):
            setattr(copy.algorithm, name, dataclasses.replace(getattr(self.algorithm, name)))
        copy.make_paths_absolute()
        return copy

    def to_dict(self) -> dict:
        """Every key, with only the selected algorithm's options section (the others are at their defaults)."""
        data = asdict(self)
        for fld in dataclasses.fields(self.algorithm):
            if fld.name != self.algorithm.name and isinstance(getattr(self.algorithm, fld.name), AlgorithmOptions):
                data["algorithm"].pop(fld.name)
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- the config classes with every registered algorithm's options ------------------------------------------------------
_CLASSES: dict[tuple[tuple[str, type], ...], type[Config]] = {}


def config_class() -> type[Config]:
    """:class:`Config` whose ``algorithm`` section has one typed field per registered algorithm with options."""
    sections = tuple((name, get_algorithm(name).Options) for name in list_algorithms()
                     if dataclasses.fields(get_algorithm(name).Options))
    if sections not in _CLASSES:
        algorithm_cls = dataclasses.make_dataclass(
            "AlgorithmConfig", [(name, opts, field(default_factory=opts)) for name, opts in sections],
            bases=(AlgorithmConfig,))
        config_cls = dataclasses.make_dataclass(
            "Config", [("algorithm", algorithm_cls, field(default_factory=algorithm_cls))], bases=(Config,))
        for cls in (algorithm_cls, config_cls):
            cls.__module__ = __name__
            cls.__doc__ = cls.__mro__[1].__doc__
        describe(algorithm_cls, {name: f"{name}'s options (used with algorithm.name: {name})" for name, _ in sections})
        describe(config_cls)
        for _, opts in sections:
            describe(opts)
        _CLASSES[sections] = config_cls
    return _CLASSES[sections]


class _HelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, with the algorithm list (the epilog) kept one per line."""


def algorithms_help() -> str:
    """One line per registered algorithm (``algorithm.name``) with its description, for ``--help``."""
    lines = [f"  {name}: {get_algorithm(name).description}" for name in list_algorithms()]
    return "algorithms (algorithm.name):\n" + "\n".join(lines)


def _parser(config_cls: type[Config]) -> ArgumentParser:
    parser = ArgumentParser(prog="fl-sd", exit_on_error=False, allow_abbrev=False,
                            description="fl-sd: federated MHMD / FedBABU / FedAvg ... Options after --config override it.",
                            epilog=algorithms_help(), formatter_class=_HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (configs/*.yaml)")
    parser.add_argument("--resume", type=Optional[str], default=None, help="continue the run in this directory")
    parser.add_class_arguments(config_cls)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, Optional[str]]:
    """Parse ``--config FILE`` plus dotted overrides into a validated :class:`Config` (and the --resume dir)."""
    config_cls = config_class()
    argv = list(sys.argv[1:] if argv is None else argv)
    print_config = [a for a in argv if a == "--print_config" or a.startswith("--print_config=")]
    argv = [a for a in argv if a not in print_config]
    for path in _option_values(argv, "--config"):
        check_config_file(path, config_cls)
    parser = _parser(config_cls)
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
    cfg = config_cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(config_cls)})
    _type_dict_overrides(cfg, argv)
    validate(cfg)
    if print_config:  # the validated config with typed values (jsonargparse's own would print dict overrides as text)
        print(cfg.to_yaml(), end="")
        raise SystemExit(0)
    return cfg, resume


def _option_values(argv: list[str], option: str) -> list[str]:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith(option + "=")]


def _dict_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of the dict-valued keys (model.options, flower.ray_init_args) of a config class."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out += _dict_keys(hint, f"{prefix}{name}.")
        elif hint is dict or typing.get_origin(hint) is dict:
            out.append(prefix + name)
    return out


def _type_dict_overrides(cfg: Config, argv: list[str]) -> None:
    """``--model.options.width 8`` sets one key of a dict-valued key; its value is read as YAML (8 is an int)."""
    for key in _dict_keys(type(cfg)):
        flag = f"--{key}."
        pairs = [(a, argv[i + 1]) for i, a in enumerate(argv[:-1]) if a.startswith(flag) and "=" not in a]
        pairs += [tuple(a.split("=", 1)) for a in argv if a.startswith(flag) and "=" in a]
        for option, text in pairs:
            sub = option[len(flag):]
            target = cfg
            for part in key.split("."):
                target = getattr(target, part)
            try:
                target[sub] = yaml.safe_load(text) if isinstance(text, str) else text
            except yaml.YAMLError:
                raise ConfigError(f"config key {key}.{sub}: {text!r} is not a YAML value") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name}: key {key!r} is given twice in one mapping (lines {seen[key]} and "
                                  f"{line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def check_config_file(path: str, config_cls: type | None = None) -> None:
    """One clear line for a config file that is not a UTF-8 YAML mapping of sections, repeats a key, or gives a
    section (``federation:``) a scalar. A missing file or a YAML syntax error is left to the parser's message."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a text YAML file (byte {raw[err.start]:#04x} at offset {err.start} is not "
                          "UTF-8); pass a YAML config such as configs/smoke.yaml") from None
    loader = _UniqueKeyLoader(text)
    loader.name = path
    try:
        data = loader.get_single_data()
    except yaml.YAMLError:
        return
    finally:
        loader.dispose()
    example = "a mapping of config sections, e.g. 'federation: {rounds: 10}'"
    if data is None:
        raise ConfigError(f"{path} is empty; a config file holds {example}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not {example}")
    _check_sections(data, config_cls or config_class(), "", path)


def _check_sections(data: dict, cls: type, prefix: str, path: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        hint = hints.get(key)
        if hint is None or not dataclasses.is_dataclass(hint) or value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: config key {prefix}{key} is a section, got {value!r}; write its keys under it "
                              f"(e.g. '{prefix}{key}: {{KEY: VALUE}}'; fl-sd --help lists them)")
        _check_sections(value, hint, f"{prefix}{key}.", path)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """A validated Config from a YAML file plus ``["--federation.rounds", "4", ...]`` overrides."""
    cfg, _ = parse_args(["--config", str(path), *(overrides or [])])
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a run directory's config.yaml).

    Configs written before the typed algorithm options had ``algorithm.options``: it becomes ``algorithm.<name>``.
    """
    data = dict(data)
    algorithm = dict(data.get("algorithm") or {})
    if "options" in algorithm:
        options = algorithm.pop("options") or {}
        if options:
            algorithm[algorithm.get("name", AlgorithmConfig.name)] = options
        data["algorithm"] = algorithm
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(data, fh)
    try:
        return load_config(fh.name)
    finally:
        os.unlink(fh.name)


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The config a run was started with (``--resume``); its ``run_dir`` is that directory."""
    cfg = config_from_dict(read_run_config(Path(run_dir)))
    cfg.run_dir = str(run_dir)
    return cfg


def _one_line(message: str) -> str:
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    text = " ".join(lines)
    text = text.replace("Parser key ", "config key ").replace("Group ", "config section ")
    section = re.search(r'config key "([\w.]+)": Unable to load config', text)
    if section:
        key = section.group(1)
        return (f"config key {key} is a section, not a value; set one of its keys (--{key}.KEY VALUE) or give a "
                f"mapping (--{key} '{{KEY: VALUE}}'); fl-sd --help lists them")
    text = re.sub(r"config section '([\w.]+)' does not accept option '([\w.]+)'",
                  r"config key \1.\2: unknown key", text)
    if "unrecognized arguments" in text or "unknown key" in text:
        text += " (check the key's spelling: fl-sd --help lists every key)"
    return text


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"config key {key}: {message}")


def validate(cfg: Config) -> None:
    """Check values and cross-field rules; raise ConfigError naming the key. Cheap: no data is read."""
    d, m, a, f, p = cfg.data, cfg.model, cfg.algorithm, cfg.federation, cfg.personalization
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    _check(cfg.name is None or bool(re.fullmatch(r"[A-Za-z0-9_+=,-][A-Za-z0-9_.+=,-]*", cfg.name)), "name",
           f"{cfg.name!r} is not a plain directory name (letters, digits, . _ - + = , ; no / and no leading dot); "
           "set run_dir to put the run elsewhere")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _check(d.num_clients >= 1, "data.num_clients", f"must be >= 1, got {d.num_clients}")
    _check(d.shards_per_client >= 1, "data.shards_per_client", f"must be >= 1, got {d.shards_per_client}")
    _check(d.alpha > 0, "data.alpha", f"must be > 0, got {d.alpha}")
    _check(d.dataset != "npz" or bool(d.path), "data.path", "dataset npz needs data.path: the .npz file to read")
    _check(m.name in list_models(), "model.name", f"unknown model {m.name!r}; choose one of {list_models()}")
    _check(m.num_classes is None or m.num_classes >= 2, "model.num_classes", f"must be >= 2, got {m.num_classes}")
    _check("num_classes" not in m.options, "model.options.num_classes", "set model.num_classes instead")
    if m.name in list_models():
        params = inspect.signature(model_entry(m.name).builder).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            accepted = sorted(k for k in params if k != "num_classes")
            for key in m.options:
                _check(key in accepted, f"model.options.{key}", f"{m.name} has no option {key!r}; it takes {accepted}")
        if "head_layout" in m.options:
            _check(m.options["head_layout"] in HEAD_LAYOUTS, "model.options.head_layout",
                   f"must be one of {HEAD_LAYOUTS}, got {m.options['head_layout']!r}")
    _check(a.name in list_algorithms(), "algorithm.name",
           f"unknown algorithm {a.name!r}; choose one of {list_algorithms()}")
    for key, preset in (("algorithm.loss", a.loss), ("personalization.loss", p.loss)):
        _check(preset is None or preset in PRESETS, key, f"unknown loss preset {preset!r}; choose one of {sorted(PRESETS)}")
    try:
        loss_config(a.loss or get_algorithm(a.name).loss, **cfg.loss_options())
    except ValueError as err:
        raise ConfigError(f"config key algorithm.loss_options: {err}") from None
    _validate_algorithm_sections(cfg)
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
    for key, bound in (("federation.diverge_loss", f.diverge_loss), ("federation.diverge_weight", f.diverge_weight)):
        _check(bound is None or bound > 0, key, f"must be > 0 or null, got {bound}")
    _check(f.eval_batch_size >= 1, "federation.eval_batch_size", f"must be >= 1, got {f.eval_batch_size}")
    _check(p.epochs >= 0, "personalization.epochs", f"must be >= 0, got {p.epochs}")
    _check(p.lr >= 0, "personalization.lr", f"must be >= 0, got {p.lr}")
    _check(p.momentum is None or 0 <= p.momentum < 1, "personalization.momentum",
           f"must be in [0, 1) or null, got {p.momentum}")
    _check(p.batch_size is None or p.batch_size >= 1, "personalization.batch_size", f"must be >= 1, got {p.batch_size}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0, got {cfg.checkpoint.every}")
    _validate_flower(cfg.flower)
    _check(cfg.batched.max_clients >= 0, "batched.max_clients", f"must be >= 0, got {cfg.batched.max_clients}")
    _check(cfg.batched.compile == "off" or cfg.backend == "batched", "batched.compile",
           f"compiles the batched engine's step, but backend is {cfg.backend}; set backend: batched or compile: off")
    if cfg.backend == "batched":
        algorithm = get_algorithm(a.name)(cfg.algorithm_options())
        _check(algorithm.batchable, "backend", f"algorithm {a.name} cannot run on the batched engine (its local "
               "update is not one plain training pass: step hooks or phases); use backend: inprocess")


def _validate_algorithm_sections(cfg: Config) -> None:
    a = cfg.algorithm
    for fld in dataclasses.fields(a):
        options = getattr(a, fld.name)
        if not isinstance(options, AlgorithmOptions):
            continue
        if fld.name != a.name:
            _check(options == type(options)(), f"algorithm.{fld.name}",
                   f"set, but algorithm.name is {a.name}; remove the section or set algorithm.name: {fld.name}")
            continue
        try:
            options.validate()
        except OptionError as err:
            raise ConfigError(f"config key algorithm.{a.name}.{err.field}: {err.message}") from None


def _validate_flower(fl: FlowerConfig) -> None:
    _check(fl.num_cpus > 0, "flower.num_cpus", f"must be a number > 0, got {fl.num_cpus}")
    _check(fl.num_gpus >= 0, "flower.num_gpus", f"must be a number >= 0, got {fl.num_gpus}")
    _check(fl.ray_address in (None, "auto") or bool(re.fullmatch(r"(ray://)?[^\s:/]+:\d{1,5}", fl.ray_address)),
           "flower.ray_address", f"must be auto, HOST:PORT or ray://HOST:PORT (or null: a local Ray), got "
           f"{fl.ray_address!r}")
    _check("address" not in fl.ray_init_args, "flower.ray_init_args",
           "must not hold the address (set it with flower.ray_address)")
    _check(fl.round_timeout is None or fl.round_timeout > 0, "flower.round_timeout",
           f"must be seconds > 0 or null, got {fl.round_timeout}")
    _check(fl.startup_timeout > 0, "flower.startup_timeout", f"must be seconds > 0, got {fl.startup_timeout}")
    _check(fl.retry_after is None or fl.retry_after > 0, "flower.retry_after",
           f"must be seconds > 0 or null, got {fl.retry_after}")

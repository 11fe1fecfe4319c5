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
from typing import Any, Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, DefaultHelpFormatter

from fl_sd.losses import PRESETS, loss_config
from fl_sd.models import HEAD_LAYOUTS, list_models
from fl_sd.models.registry import model_entry

from .algorithms import AlgorithmOptions, get_algorithm, list_algorithms
from .errors import ConfigError, OptionError
from .fielddocs import describe
from .rundir import read_run_config
from .schema import (AlgorithmConfig, BatchedConfig, CheckpointConfig, DataConfig, FederationConfig,
                     FlowerConfig, LossOptions, ModelConfig, PersonalizationConfig, RunFields, SyntheticOptions,
                     TrackingConfig, _option_values, check_config_file, check_keys)

#: The sections' classes live in orchestrator.schema (no torch); importable from here as before.
__all__ = ["AlgorithmConfig", "BatchedConfig", "CheckpointConfig", "Config", "DataConfig", "FederationConfig",
           "FlowerConfig", "LossOptions", "ModelConfig", "PersonalizationConfig", "SyntheticOptions", "TrackingConfig",
           "check_config_file", "config_class", "config_from_dict", "load_config", "load_run_config", "parse_args",
           "validate"]


@describe
@dataclass
class Config(RunFields):
    """The run: its seed, name, where it is written, the device and the execution backend."""

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
    argv = list(sys.argv[1:] if argv is None else argv)
    check_keys(argv)  # the schema alone: a typo is reported before the algorithm registry (torch) is loaded
    config_cls = config_class()
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
    _check(cfg.memory_format == "contiguous" or cfg.backend != "batched", "memory_format",
           "channels_last cannot be kept under the batched engine's torch.func.vmap (its convolutions become grouped "
           "convolutions in the default layout); use memory_format: contiguous there (on a GPU, batched.compile lets "
           "inductor choose the layout), or backend: inprocess")
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

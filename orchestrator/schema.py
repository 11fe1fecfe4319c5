"""The config schema: every section's keys, types, defaults and one-line descriptions, and the checks that need
nothing else (a misspelt key, a bad config file). A leaf of the config layer: it imports neither torch nor the
algorithm registry, so ``fl-sd`` reports a typo before loading them (:func:`check_keys`; ``orchestrator.config``
builds the full parser, with each algorithm's options section, on top of :class:`RunFields`).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .fielddocs import describe
from .fingerprint import flatten


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
    #: batch size of evaluations (no effect on the numbers, except for BatchNorm without running statistics: a client's
    #: test split longer than this is evaluated in batches of this size, as the reference)
    eval_batch_size: int = 500
    #: the logged temp_aux* of a model whose BatchNorm has no running statistics (FedBABU/FedAvg models): reference =
    #: the first 1000 test images as one batch of their own (an extra pass); evaluation = the same images, each as
    #: computed in its client's evaluation batch (no extra pass; other numbers). Models with running statistics:
    #: always from the evaluation pass (the same numbers either way)
    temperature_pass: Literal["reference", "evaluation"] = "reference"
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

    #: clients per batched computation; 0 = a whole round / all clients; a chunk that runs out of device memory is
    #: run again in halves (the run keeps the smaller size)
    max_clients: int = 0
    #: torch.compile the batched step: off (eager) | default | reduce-overhead (CUDA graphs on a GPU) | max-autotune;
    #: compiled once per run (minutes on a CPU), then reused by every round
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"


@describe
@dataclass
class RunFields:
    """The run's keys: its seed, name, where it is written, the device, the backend and the sections (the base of
    :class:`orchestrator.config.Config`, which adds what needs the algorithm registry)."""

    seed: int = 1  #: seed of the partition, client sampling, initialisation and batches
    name: Optional[str] = None  #: run name; default: derived from dataset, algorithm, s, f, tau, seed
    run_dir: Optional[str] = None  #: default: runs/<name>
    device: str = "auto"  #: auto (cuda when present), cpu, cuda, cuda:N
    #: inprocess = clients one after another; deployment: set by the Flower App's ServerApp (flwr run)
    backend: Literal["inprocess", "batched", "flower", "deployment"] = "inprocess"
    precision: Literal["32-true", "64-true", "bf16-mixed"] = "32-true"  #: Lightning's names; bf16-mixed = autocast
    #: layout of the network's weights and activations: contiguous (NCHW, the reference's) or channels_last (NHWC:
    #: the same numbers up to float reassociation, often faster convolutions; not with backend batched)
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    batched: BatchedConfig = field(default_factory=BatchedConfig)


#: Options of the command line that are not config keys
_NOT_KEYS = ("--config", "--resume", "--print_config", "--help", "-h")


def _static_key_error(key: str) -> Optional[str]:
    """Why dotted ``key`` is no key of the static schema (None: it is one, or it lies below a part the schema does not
    fix: a dict-valued key such as model.options, or an algorithm's section ``algorithm.<name>``)."""
    cls: Any = RunFields
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            if cls is AlgorithmConfig and i >= len(parts) - 2:  # algorithm.<name>[.<option>]: the registry's
                return None
            return "unknown key"
        hint = hints[part]
        if not dataclasses.is_dataclass(hint):
            return None if i == len(parts) - 1 or hint is dict or typing.get_origin(hint) is dict else "not a section"
        cls = hint
    return None


def check_keys(argv: list[str]) -> None:
    """A misspelt key on the command line or in a ``--config`` file is reported from the schema alone, before the
    algorithm registry (and torch) is imported; what this cannot decide is left to the full parser."""
    for arg in argv:
        if not arg.startswith("--") or arg.split("=", 1)[0] in _NOT_KEYS:
            continue
        key = arg[2:].split("=", 1)[0]
        if _static_key_error(key):
            raise ConfigError(f"unrecognized arguments: {arg} (check the key's spelling: fl-sd --help lists every key)")
    for path in _option_values(argv, "--config"):
        check_config_file(path, RunFields)
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # a missing or unparsable file: the parser's message
        for key in flatten(tree) if isinstance(tree, dict) else []:
            if _static_key_error(key) == "unknown key":
                raise ConfigError(f"{path}: config key {key}: unknown key (check the key's spelling: fl-sd --help "
                                  "lists every key)")


def _option_values(argv: list[str], option: str) -> list[str]:
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == option]
    return values + [a.split("=", 1)[1] for a in argv if a.startswith(option + "=")]


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
    _check_sections(data, config_cls or RunFields, "", path)


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

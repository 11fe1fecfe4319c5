"""Building a federation's pieces from its config: device, algorithm, data, partition, network, losses.

Both sides use these: ``orchestrator.federation`` (in-process) and the Flower ClientApp, which builds only the client
side (``orchestrator.clients.ClientRuntime``).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch

from fl_sd.data import ImageDataset, Partition, load_dataset, make_partition
from fl_sd.losses import LossConfig
from fl_sd.models import MultiHeadNet, create_model, model_entry
from lightning_modules.client import build_loss_config as module_loss_config

from .algorithms import Algorithm, get_algorithm
from .config import Config
from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key device: {name!r} asked for but CUDA is not available; use device: auto or cpu")
    return device


def precision_settings(precision: str, device: torch.device) -> tuple[torch.dtype, torch.autocast | None]:
    """(dtype of the weights and the input batches, autocast context or None) of a ``precision`` (Lightning's names:
    ``32-true``, ``64-true``, ``bf16-mixed`` = float32 weights, bfloat16 autocast of forward and loss)."""
    if precision == "32-true":
        return torch.float32, None
    if precision == "64-true":
        return torch.float64, None
    if precision == "bf16-mixed":
        return torch.float32, torch.autocast(device.type, dtype=torch.bfloat16)
    raise ConfigError(f"config key precision: unknown {precision!r}; choose 32-true, 64-true or bf16-mixed")


def make_algorithm(cfg: Config) -> Algorithm:
    """The configured algorithm with its typed options (``algorithm.<name>``)."""
    return get_algorithm(cfg.algorithm.name)(cfg.algorithm_options())


def load_data(cfg: Config) -> ImageDataset:
    d = cfg.data
    synthetic = cfg.synthetic_options() if d.dataset == "synthetic" else {}  # applies to that source only
    dataset = load_dataset(d.dataset, root=d.root, download=d.download, path=d.path, **synthetic)
    num_classes = cfg.model.num_classes or dataset.num_classes
    if num_classes != dataset.num_classes:
        raise ConfigError(f"config key model.num_classes: {num_classes} but dataset {d.dataset} has "
                          f"{dataset.num_classes} classes; remove model.num_classes or fix it")
    return dataset


def client_partition(cfg: Config, dataset: ImageDataset) -> Partition:
    d = cfg.data
    partition = make_partition(d.partition, dataset.train_labels, dataset.test_labels, d.num_clients, cfg.seed,
                               shards_per_client=d.shards_per_client, alpha=d.alpha, num_classes=dataset.num_classes)
    return check_partition(cfg, partition)


def check_partition(cfg: Config, partition: Partition) -> Partition:
    if partition.num_clients != cfg.data.num_clients:
        raise ConfigError(f"config key data.num_clients: {cfg.data.num_clients} but the partition has "
                          f"{partition.num_clients} clients")
    return partition


def model_options(cfg: Config, algorithm: Algorithm, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """The model's constructor options: the algorithm's defaults it accepts, the data's shape, then model.options."""
    builder = model_entry(cfg.model.name).builder
    accepted = set(inspect.signature(builder).parameters)
    options = {k: v for k, v in algorithm.model_defaults.items() if k in accepted}
    c, h, _ = image_shape
    if "in_channels" in accepted:
        options["in_channels"] = c
    if "input_size" in accepted:
        options["input_size"] = h
    options.update(cfg.model.options)
    return options


def build_network(cfg: Config, algorithm: Algorithm, image_shape: tuple[int, int, int],
                  num_classes: int) -> MultiHeadNet:
    """The initial network, seeded by ``cfg.seed`` (every side of a federation builds the same one)."""
    torch.manual_seed(cfg.seed)
    return create_model(cfg.model.name, num_classes=num_classes, **model_options(cfg, algorithm, image_shape))


def model_description(cfg: Config, num_classes: int) -> str:
    return f"{cfg.model.name} with {num_classes} classes and model.options {cfg.model.options}"


def loss_configs(cfg: Config, algorithm: Algorithm) -> tuple[LossConfig, LossConfig]:
    """(federated training loss, personalisation loss): model defaults < the preset < algorithm.loss_options."""
    preset = cfg.algorithm.loss or algorithm.loss
    options = cfg.loss_options()
    train = _loss_config(cfg.model.name, preset, options)
    finetune = _loss_config(cfg.model.name, cfg.personalization.loss or preset, options)
    return train, finetune


def _loss_config(model_name: str, preset: str, options: dict[str, Any]) -> LossConfig:
    try:
        return module_loss_config(preset, options, model_name)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key algorithm.loss_options: {err}") from None

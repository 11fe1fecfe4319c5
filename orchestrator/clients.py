"""The client side of a federation: device-resident data, per-client index sets, the client module, batch streams.

:class:`ClientRuntime` is what every engine runs clients with (sequential, Flower simulation, Flower deployment); it
is the :class:`~orchestrator.algorithms.context.ClientContext` algorithms see. :func:`run_client` is one client's
work: (the global state, the job with the client's own kept state) -> :class:`ClientResult`. Nothing here holds or
writes server state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from fl_sd.data import DeviceData, ImageDataset, Partition, client_batches, seeded_generator
from fl_sd.hooks import StepHooks
from fl_sd.losses import LossConfig, MultiHeadLoss
from fl_sd.models import use_channels_last
from lightning_modules.batched import ClientFailed, batched_local_update
from lightning_modules.client import ClientUpdate, MultiHeadClassifier

from .algorithms import Algorithm
from .algorithms.context import TRAIN_STREAM, Batch, ClientJob, State
from .chunks import ClientChunks
from .build import (build_network, check_partition, client_partition, load_data, loss_configs, precision_settings,
                    resolve_device)
from .config import Config
from .evaluation import head_names, predict, predict_splits


@dataclass
class ClientResult:
    """What a client hands back: its update (states, sample count, metrics) and its new own state (or None)."""

    client: int
    update: ClientUpdate
    own_state: State | None


class ClientRuntime:
    """Data on the device, the clients' index sets, one client module serving every client in turn."""

    def __init__(self, cfg: Config, algorithm: Algorithm, dataset: ImageDataset, partition: Partition,
                 device: torch.device, log: Callable[[str], None] = print):
        f = cfg.federation
        self.device = device
        self.seed = cfg.seed
        self.local_epochs = f.local_epochs
        self.batch_size = f.batch_size
        self.eval_batch_size = f.eval_batch_size
        #: where the logged temperatures of a batch-dependent model come from (federation.temperature_pass)
        self.temperature_pass = f.temperature_pass
        self.augment = cfg.data.augment
        self._base_lr, self._head_lr = f.lr, f.head_lr
        self.partition = check_partition(cfg, partition)
        self.num_clients = partition.num_clients
        dtype, self.autocast = precision_settings(cfg.precision, device)
        self.train_data = DeviceData(dataset.train_images, dataset.train_labels, dataset.mean, dataset.std, device,
                                     dtype=dtype)
        self.test_data = DeviceData(dataset.test_images, dataset.test_labels, dataset.mean, dataset.std, device,
                                    dtype=dtype)
        #: the batched engine's chunks of clients (backend: batched; halved when a chunk runs out of memory), else None
        self.chunks = (ClientChunks(cfg.batched.max_clients or self.num_clients, log) if cfg.backend == "batched"
                       else None)
        #: torch.compile mode of the batched step (batched.compile)
        self.compile = cfg.batched.compile
        self.train_sizes = partition.train_sizes()
        self.test_sizes = partition.test_sizes()
        self.test_owner = torch.as_tensor(partition.test_owner(len(dataset.test_labels)), device=device)
        self._train_index = [torch.as_tensor(ix, device=device) for ix in partition.train]
        self._test_index = [torch.as_tensor(ix, device=device) for ix in partition.test]

        net = build_network(cfg, algorithm, dataset.image_shape, dataset.num_classes)
        if cfg.memory_format == "channels_last":
            use_channels_last(net)
        self.module = MultiHeadClassifier(net=net, train_part=algorithm.train_part, lr=f.lr, momentum=f.momentum,
                                          weight_decay=f.weight_decay).to(device=device, dtype=dtype)
        self.net = self.module.net
        self.train_loss, self.finetune_loss = loss_configs(cfg, algorithm)
        self._losses: dict[LossConfig, MultiHeadLoss] = {}
        self.heads = head_names(net)
        self.body_keys = net.body_state_keys()
        self.head_keys = net.head_state_keys()
        #: the seeded initial model (the server's starting global state)
        self.initial_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    @classmethod
    def from_config(cls, cfg: Config, algorithm: Algorithm, partition: Partition | None = None,
                    device: torch.device | None = None, log: Callable[[str], None] = print) -> "ClientRuntime":
        """Load the data (and make the partition unless given) as the config says."""
        dataset = load_data(cfg)
        partition = partition or client_partition(cfg, dataset)
        return cls(cfg, algorithm, dataset, partition, device or resolve_device(cfg.device), log)

    @property
    def batch_clients(self) -> int:
        """Clients per batched computation when training, evaluation and personalisation run batched, else 0."""
        return self.chunks.size if self.chunks is not None else 0

    # -- the ClientContext -------------------------------------------------------------------------------------------
    def batches(self, client: int, round_idx: int, epochs: int, stream: int = TRAIN_STREAM, *,
                batch_size: int | None = None, split: str = "train") -> Iterator[Batch]:
        """``epochs`` epochs of the client's batches, seeded by (seed, stream, round, client); the train split is
        augmented (when ``data.augment``), the test split never."""
        gen = seeded_generator(self.seed, stream, round_idx, client)
        if split == "train":
            data, index, augment = self.train_data, self._train_index[client], self.augment
        elif split == "test":
            data, index, augment = self.test_data, self._test_index[client], False
        else:
            raise ValueError(f"split must be train or test, got {split!r}")
        return client_batches(data, index, batch_size or self.batch_size, epochs, gen, augment=augment)

    def num_train_samples(self, client: int) -> int:
        return int(self.train_sizes[client])

    def head_lr(self, lr: float) -> float:
        return lr if self._head_lr is None else self._head_lr * lr / self._base_lr

    def part_keys(self, part: str) -> list[str]:
        if part == "body":
            return list(self.body_keys)
        if part == "head":
            return list(self.head_keys)
        if part == "full":
            return [*self.body_keys, *self.head_keys]
        raise ValueError(f"unknown model part {part!r}; choose body, head or full")

    def train(self, batches: Iterable[Batch], *, start: State | None, part: str, lr: float,
              head_lr: float | None = None, loss: LossConfig | None = None, hooks: StepHooks | None = None,
              return_head: bool = False, num_samples: int | None = None,
              on_epoch_end: Callable[[int], None] | None = None, steps_per_epoch: int | None = None,
              momentum: float | None = None) -> ClientUpdate:
        return self.module.local_update(
            batches, state=start, train_part=part, lr=lr, head_lr=self.head_lr(lr) if head_lr is None else head_lr,
            loss=self._loss(loss or self.train_loss), hooks=hooks, return_head=return_head, num_samples=num_samples,
            on_epoch_end=on_epoch_end, steps_per_epoch=steps_per_epoch, autocast=self.autocast, momentum=momentum)

    def train_batched(self, batches: list[Iterable[Batch]], *, starts: list[State], part: str, lr: float,
                      head_lr: float | None = None, loss: LossConfig | None = None, return_head: bool = False,
                      num_samples: list[int] | None = None, steps_per_epoch: list[int] | None = None,
                      on_epoch_end: Callable | None = None, momentum: float | None = None) -> list[ClientUpdate]:
        return batched_local_update(
            self.module, starts, batches, train_part=part, lr=lr,
            head_lr=self.head_lr(lr) if head_lr is None else head_lr, loss=self._loss(loss or self.train_loss),
            return_head=return_head, num_samples=num_samples, steps_per_epoch=steps_per_epoch,
            on_epoch_end=on_epoch_end, autocast=self.autocast, momentum=momentum, compile=self.compile)

    def load(self, state: State) -> None:
        self.module.load_state(state)

    def predict(self, client: int | None, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        index = None if client is None else self._test_index[client]
        return predict(self.net, self.test_data, index, batch_size or self.eval_batch_size, self.autocast)

    def test_split(self, client: int) -> torch.Tensor:
        """The indices of ``client``'s test samples in ``test_data`` (on the device)."""
        return self._test_index[client]

    def predict_each(self, clients: Iterable[int], batch_size: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(correct, loss), (H, n_c), of every client in ``clients`` with the network's current weights, each client's
        test split as its own batch (what a model with batch-dependent BatchNorm needs; ``predict_splits``)."""
        return predict_splits(self.net, self.test_data, [self._test_index[c] for c in clients],
                              batch_size or self.eval_batch_size)

    def _loss(self, config: LossConfig) -> MultiHeadLoss:
        if config not in self._losses:
            self._losses[config] = MultiHeadLoss(config)
        return self._losses[config]


def run_client(runtime: ClientRuntime, algorithm: Algorithm, job: ClientJob, global_state: State) -> ClientResult:
    """One client's local update for ``job`` (its batches: ``local_epochs`` of the training stream)."""
    batches = runtime.batches(job.client, job.round, runtime.local_epochs)
    try:
        update, own = algorithm.client_update(runtime, job, global_state, batches)
    except FloatingPointError as err:
        raise FloatingPointError(f"client {job.client}: {err}") from None
    return ClientResult(job.client, update, own)


def run_clients_batched(runtime: ClientRuntime, algorithm: Algorithm, jobs: list[ClientJob],
                        global_state: State) -> list[ClientResult]:
    """The local updates of ``jobs`` as one computation (``Algorithm.batched_client_updates``), in job order."""
    batches = [runtime.batches(job.client, job.round, runtime.local_epochs) for job in jobs]
    try:
        results = algorithm.batched_client_updates(runtime, jobs, global_state, batches)
    except ClientFailed as err:
        raise FloatingPointError(f"client {jobs[err.index].client}: {err}") from None
    return [ClientResult(job.client, update, own) for job, (update, own) in zip(jobs, results)]

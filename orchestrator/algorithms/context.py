"""What an algorithm may touch: the client-side context and the job it is given (a leaf module, torch only).

An algorithm never sees an orchestrator object. On the client side it gets a :class:`ClientContext` -- implemented by
``orchestrator.clients.ClientRuntime``, the same in every engine (sequential, Flower simulation, Flower deployment) --
and a :class:`ClientJob`; on the server side, at set-up, a :class:`ServerContext`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from fl_sd.hooks import StepHooks
    from fl_sd.losses import LossConfig
    from lightning_modules.client import ClientUpdate

State = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]

#: Parts of a multi-head model: the body (feature extractor, BN buffers included), the heads (final + auxiliary
#: classifiers with their temperature rows), or all of it.
Part = Literal["body", "head", "full"]
PARTS: tuple[str, ...] = ("body", "head", "full")

#: Seed streams of a client's batches (``ClientContext.batches(..., stream=...)``); an algorithm that needs another
#: stream picks its own constant.
TRAIN_STREAM, FINETUNE_STREAM = 0, 1_000_003


def check_part(part: str | None, what: str, allow_none: bool = False) -> None:
    if part is None and allow_none:
        return
    if part not in PARTS:
        raise ValueError(f"{what} must be one of {PARTS}{' or None' if allow_none else ''}, got {part!r}")


@dataclass(frozen=True)
class ClientJob:
    """One client's work: ``round`` is the 0-based index of the round being trained (at evaluation and
    personalisation: the number of rounds the model has completed), ``lr`` that round's learning rate, ``own_state``
    what the server keeps for the client (the algorithm's ``keeps`` part; None before the client's first round)."""

    client: int
    round: int
    lr: float
    own_state: State | None = None


class ClientContext(Protocol):
    """The client side of a federation, as an algorithm sees it (``orchestrator.clients.ClientRuntime``)."""

    #: the local loss of federated training, and of personalisation (fine-tuning)
    train_loss: "LossConfig"
    finetune_loss: "LossConfig"
    #: tau, local epochs per round
    local_epochs: int
    #: federation.batch_size (B batches per epoch = ceil(n / batch_size))
    batch_size: int
    #: number of clients of the federation
    num_clients: int
    #: names of the network's heads: final, aux0, aux1, ...
    heads: list[str]
    #: (num_test,) client id of every test sample (-1: none)
    test_owner: torch.Tensor

    def batches(self, client: int, round_idx: int, epochs: int, stream: int = TRAIN_STREAM, *,
                batch_size: int | None = None, split: str = "train") -> Iterator[Batch]:
        """The client's seeded batches: (seed, stream, round, client) fix order and augmentation (train split only)."""

    def num_train_samples(self, client: int) -> int: ...

    def head_lr(self, lr: float) -> float:
        """The heads' learning rate when the body's is ``lr`` (``federation.head_lr`` scales with the schedule)."""

    def part_keys(self, part: str) -> list[str]:
        """State-dict keys of a model part (body / head / full)."""

    def train(self, batches: Iterable[Batch], *, start: State | None, part: str, lr: float,
              head_lr: float | None = None, loss: "LossConfig | None" = None, hooks: "StepHooks | None" = None,
              return_head: bool = False, num_samples: int | None = None,
              on_epoch_end: Callable[[int], None] | None = None,
              steps_per_epoch: int | None = None, momentum: float | None = None) -> "ClientUpdate":
        """The one local loop (``MultiHeadClassifier.local_update``) from ``start`` (None: the weights as they are);
        ``momentum`` None: ``federation.momentum``."""

    def train_batched(self, batches: list[Iterable[Batch]], *, starts: list[State], part: str, lr: float,
                      head_lr: float | None = None, loss: "LossConfig | None" = None, return_head: bool = False,
                      num_samples: list[int] | None = None) -> list["ClientUpdate"]:
        """Several clients' ``train`` as one computation (``lightning_modules.batched``): client k from the full
        state ``starts[k]`` on ``batches[k]``; the same settings for all (no hooks)."""

    def load(self, state: State) -> None:
        """Copy a (full or partial) state into the client's network."""

    def predict(self, client: int | None, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct, loss) of every head, (H, n), on ``client``'s test split (None: the whole test set) with the
        network's current weights, in eval mode."""

    def predict_each(self, clients: Iterable[int], batch_size: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``predict`` for each client of ``clients``, each client's test split as its own batch (what BatchNorm
        without running statistics needs: it normalises with the batch's statistics)."""


class ServerContext(Protocol):
    """What an algorithm may touch when a federation is set up (``Algorithm.setup``)."""

    #: the global model's state, changed in place
    global_state: State
    #: ``federation.select``: best (best-on-test round) or final
    select: str
    #: one line naming the model (for error messages)
    model_description: str

    def log(self, message: str) -> None: ...

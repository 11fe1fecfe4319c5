"""The algorithm contract: a small object stating what differs between federated methods.

An algorithm decides

1. what trains locally (``train_part``), with which loss (``loss``), and how (``client_update``);
2. which part of the model the server averages (``aggregate``) and how the average enters the global model;
3. which part of the model a client keeps for itself across rounds (``keeps``): the server stores it and hands it
   back with the client's next job, and the client is evaluated and personalised with it;
4. which model a client is evaluated and fine-tuned with (``client_model``), and how clients are evaluated
   (``evaluate``).

Parts are ``body``, ``head`` or ``full`` (:data:`~orchestrator.algorithms.context.PARTS`); anything else is an error.
Algorithms see only the documented contexts of :mod:`orchestrator.algorithms.context` and the round index they are
given. Client side and server side are apart: ``client_update`` is a function of (the global state, the client's own
kept state, its batches, lr, round) returning the update and the client's new own state; it never writes server
state. A new method is one file with a subclass registered by ``@register_algorithm`` (its typed options: an
:class:`AlgorithmOptions` dataclass as ``Options``, listed by ``--help`` as ``algorithm.<name>.<field>``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from .. import evaluation
from ..evaluation import Scores
from .context import ClientContext, ClientJob, ServerContext, State, check_part
from .options import AlgorithmOptions

if TYPE_CHECKING:  # pragma: no cover
    from lightning_modules.client import ClientUpdate

_ALGORITHMS: dict[str, type["Algorithm"]] = {}


def register_algorithm(cls):
    if cls.name in _ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    for attr, allow_none in (("train_part", False), ("aggregate", False)):
        check_part(getattr(cls, attr), f"{cls.name}.{attr}", allow_none)
    _ALGORITHMS[cls.name] = cls
    return cls


def unregister_algorithm(name: str) -> None:
    """Remove a registered algorithm (for algorithms defined in tests)."""
    _ALGORITHMS.pop(name, None)


def list_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type["Algorithm"]:
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {list_algorithms()}") from None


def select_part(update: "ClientUpdate", part: str) -> State:
    """The ``part`` of a client update's state (``head``/``full`` need ``return_head=True`` in the update)."""
    check_part(part, "part")
    state: State = {}
    if part in ("body", "full"):
        state.update(update.body_state)
    if part in ("head", "full"):
        if update.head_state is None:
            raise ValueError(f"part {part!r} of a client update without head state (train with return_head=True)")
        state.update(update.head_state)
    return state


def overlay(base: State, own: State | None) -> State:
    """``base`` with a client's own part on top (the model that client uses)."""
    return base if not own else {**base, **own}


class Algorithm:
    """FedAvg-shaped defaults; subclasses override class attributes or hooks."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    #: typed options (``algorithm.<name>.*`` in the config)
    Options: ClassVar[type[AlgorithmOptions]] = AlgorithmOptions
    #: default local loss preset (fl_sd.losses.PRESETS); the config's algorithm.loss overrides it
    loss: ClassVar[str] = "ce"
    #: which part trains locally: "body" (heads frozen), "head" or "full"
    train_part: ClassVar[str] = "full"
    #: which part the server averages and broadcasts
    aggregate: ClassVar[str] = "full"
    #: the part a client keeps across rounds (None: nothing, every client uses the global model); see ``keeps``
    keeps_part: ClassVar[str | None] = None
    #: defaults for the model's constructor options (the config's model.options override them)
    model_defaults: ClassVar[dict[str, Any]] = {"track_running_stats": False}

    def __init__(self, options: AlgorithmOptions | None = None):
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise TypeError(f"{self.name} options must be {self.Options.__name__}, got {type(options).__name__}")
        options.validate()
        self.options = options
        check_part(self.keeps, f"{self.name}.keeps", allow_none=True)

    @property
    def keeps(self) -> str | None:
        """The part of the model a client keeps across rounds (may depend on the options)."""
        return self.keeps_part

    #: whether ``end_round`` needs the global state as it was before the round (a copy is made only then)
    needs_round_start_state: ClassVar[bool] = False

    # -- server side ---------------------------------------------------------------------------------------------
    def setup(self, server: ServerContext) -> None:
        """Called once when the federation is built (before any round, and before a checkpoint is loaded)."""

    def end_round(self, round_idx: int, selected: list[int], round_start_state: State | None) -> None:
        """Server side, after round ``round_idx`` (0-based) was aggregated: ``selected`` are its clients in job order,
        ``round_start_state`` the global state before it (only when ``needs_round_start_state``, else None). What an
        algorithm remembers here is its server-side memory (``state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's server-side memory (checkpointed with the federation); default: none."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device) -> None:
        """Restore ``state_dict()`` (tensors moved to ``device``)."""

    def shared_keys(self, body_keys: Iterable[str], head_keys: Iterable[str]) -> list[str]:
        """State-dict keys the server averages and broadcasts."""
        return {"body": list(body_keys), "head": list(head_keys), "full": [*body_keys, *head_keys]}[self.aggregate]

    def shared_state(self, update: "ClientUpdate") -> State:
        """What of a client's update the server averages."""
        return select_part(update, self.aggregate)

    def apply_aggregate(self, global_state: State, averaged: State) -> None:
        """Write the server's average into the global model (in place)."""
        for key, value in averaged.items():
            global_state[key].copy_(value)

    # -- client side ----------------------------------------------------------------------------------------------
    @property
    def returns_head(self) -> bool:
        """Whether the local update must return the head state (to share it or to keep it)."""
        return self.aggregate in ("head", "full") or self.keeps in ("head", "full")

    def client_update(self, ctx: ClientContext, job: ClientJob, global_state: State,
                      batches: Iterable) -> tuple["ClientUpdate", State | None]:
        """One client's local update: from the global model with the client's own part on top, train
        ``train_part`` on ``batches``; return the update and the client's new own state (its ``keeps`` part)."""
        update = ctx.train(batches, start=overlay(global_state, job.own_state), part=self.train_part, lr=job.lr,
                           loss=ctx.train_loss, return_head=self.returns_head,
                           num_samples=ctx.num_train_samples(job.client))
        return update, self.kept_state(update)

    @property
    def batchable(self) -> bool:
        """Whether the batched engine (``backend: batched``) can run this algorithm's local updates: true when the
        local update is the plain one (one ``ctx.train`` with the algorithm's part and loss, no step hooks). An
        algorithm that overrides ``client_update`` is not batchable unless it also overrides this property and
        ``batched_client_updates``."""
        return type(self).client_update is Algorithm.client_update

    def batched_client_updates(self, ctx: ClientContext, jobs: list[ClientJob], global_state: State,
                               batches: list[Iterable]) -> list[tuple["ClientUpdate", State | None]]:
        """``client_update`` of every job as one computation (``ctx.train_batched``); the same results in order."""
        if not self.batchable:
            raise TypeError(f"algorithm {self.name} cannot run on the batched engine")
        updates = ctx.train_batched(batches, starts=[overlay(global_state, j.own_state) for j in jobs],
                                    part=self.train_part, lr=jobs[0].lr, loss=ctx.train_loss,
                                    return_head=self.returns_head,
                                    num_samples=[ctx.num_train_samples(j.client) for j in jobs])
        return [(u, self.kept_state(u)) for u in updates]

    def kept_state(self, update: "ClientUpdate") -> State | None:
        return None if self.keeps is None else select_part(update, self.keeps)

    # -- which model a client uses, and how clients are evaluated -------------------------------------------------
    @property
    def per_client_models(self) -> bool:
        """True when clients' models differ (evaluation then runs client by client)."""
        return self.keeps is not None

    def client_model(self, ctx: ClientContext, job: ClientJob, base_state: State) -> State:
        """The full state ``job.client`` is evaluated and personalised with, given the base (global or best-round)
        state after ``job.round`` rounds: the base with the client's own part on top."""
        return overlay(base_state, job.own_state)

    def evaluate(self, ctx: ClientContext, base_state: State, store: dict[int, State], round_idx: int,
                 lr: float) -> Scores:
        """Per-client accuracy and loss of every head (two (H, N) arrays) of the model after ``round_idx`` rounds;
        ``lr`` is the schedule's learning rate at that point. Default: one pass when every client uses the base
        model, else each client with its ``client_model``. ``Scores.temperatures``, when not None, are the logged
        learned temperatures of ``base_state`` (``evaluation.shared_model(ctx, base_state)`` sets them from its
        passes); None (or a plain ``(acc, loss)`` pair) lets the federation compute them with their own pass."""
        if not self.per_client_models:
            return evaluation.shared_model(ctx, base_state)
        return evaluation.client_models(
            ctx, lambda c: self.client_model(ctx, ClientJob(c, round_idx, lr, store.get(c)), base_state))

"""The algorithm contract: a small object stating what differs between federated methods.

An algorithm decides (1) which parts of the network train locally and with which loss, (2) which state the server
averages, (3) what state a client keeps between rounds, and (4) which model a client is evaluated and personalised
from. The round loop (orchestrator/federation.py) never branches on the algorithm's name; a new method is one file
with a subclass registered by ``@register_algorithm``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..federation import Federation

State = dict[str, torch.Tensor]

_ALGORITHMS: dict[str, type["Algorithm"]] = {}


def register_algorithm(cls):
    if cls.name in _ALGORITHMS:
        raise ValueError(f"algorithm {cls.name!r} registered twice")
    _ALGORITHMS[cls.name] = cls
    return cls


def list_algorithms() -> list[str]:
    return sorted(_ALGORITHMS)


def get_algorithm(name: str) -> type["Algorithm"]:
    try:
        return _ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {list_algorithms()}") from None


class Algorithm:
    """FedAvg-shaped defaults; subclasses override class attributes or hooks."""

    name: ClassVar[str] = "base"
    description: ClassVar[str] = ""
    #: default local loss preset (fl_sd.losses.PRESETS); the config's algorithm.loss overrides it
    loss: ClassVar[str] = "ce"
    #: which parts train locally: "body" (heads frozen), "head" or "full"
    train_part: ClassVar[str] = "full"
    #: which parts the server averages: "body" (parameters and BN buffers) or "full"
    aggregate: ClassVar[str] = "full"
    #: each client keeps its own head across rounds (not averaged), and is evaluated/personalised with it
    personal_head: ClassVar[bool] = False
    #: the entry of ``fed.client_state[client]`` holding the part of the model a client keeps for itself ("body",
    #: or "personal" for a whole personal model), loaded on top of the global model for evaluation/personalisation
    personal_state: ClassVar[str | None] = None
    #: defaults for the model's constructor options (the config's model.options override them)
    model_defaults: ClassVar[dict[str, Any]] = {"track_running_stats": False}
    #: algorithm-specific options: name -> default (the config's algorithm.options override them)
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: dict[str, Any] | None = None):
        self.validate_options(options or {})
        self.options = {**self.option_defaults, **(options or {})}

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(cls.option_defaults))
        if unknown:
            valid = sorted(cls.option_defaults) or "none"
            raise ValueError(f"{cls.name} has no option(s) {unknown}; valid: {valid}")

    def setup(self, fed: "Federation") -> None:
        """Called once when the federation is built (before any round, and before a checkpoint is loaded)."""

    # -- what is shared ----------------------------------------------------------------------------------------
    def shared_keys(self, fed: "Federation") -> list[str]:
        """State-dict keys the server averages and broadcasts."""
        net = fed.module.net
        return net.body_state_keys() if self.aggregate == "body" else list(net.state_dict())

    # -- one client's local update ---------------------------------------------------------------------------
    def local_update(self, fed: "Federation", client: int, batches, lr: float):
        """Run one client's update from the global model; return the ClientUpdate (its state to average is
        ``update.body_state`` plus, for ``aggregate == "full"``, ``update.head_state``)."""
        head = self.client_head(fed, client)
        update = fed.module.local_update(
            batches, body_state=fed.global_body(), head_state=head, train_part=self.train_part, lr=lr,
            head_lr=fed.head_lr(lr), return_head=self.aggregate == "full" or self.personal_head,
            num_samples=fed.num_train_samples(client))
        if self.personal_head:
            fed.client_state[client] = {"head": update.head_state}
        return update

    def shared_state(self, fed: "Federation", update) -> State:
        state = dict(update.body_state)
        if self.aggregate == "full":
            state.update(update.head_state)
        return state

    def apply_aggregate(self, fed: "Federation", averaged: State) -> None:
        """Write the server's average into the global model."""
        for key, value in averaged.items():
            fed.global_state[key].copy_(value)

    # -- which model a client uses -----------------------------------------------------------------------------
    def client_head(self, fed: "Federation", client: int) -> State:
        """The head a client trains/evaluates with: its own where it keeps one, else the global head."""
        if self.personal_head and client in fed.client_state:
            return fed.client_state[client]["head"]
        return fed.global_head()

    @property
    def per_client_models(self) -> bool:
        """True when clients' models differ (evaluation then runs client by client)."""
        return self.personal_head or self.personal_state is not None

    def load_client_model(self, fed: "Federation", client: int, base_state: State,
                          store: dict[int, dict[str, State]]) -> None:
        """Put the model that ``client`` is evaluated and personalised with into ``fed.module.net``: the base
        (global or best) state, plus what the client keeps in ``store`` (its head, for personal-head methods)."""
        from ..federation import load_state_

        load_state_(fed.module.net, base_state)
        key = "head" if self.personal_head else self.personal_state
        if key is not None and client in store:
            load_state_(fed.module.net, store[client][key])

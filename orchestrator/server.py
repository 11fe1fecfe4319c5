"""The server side of a federation: the global model, what each client keeps, model selection, history.

Everything here is checkpointed (``state_dict``). Client sampling and the learning-rate schedule are server
decisions too, and pure functions of (seed, round).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .errors import CheckpointError, ConfigError
from .rundir import CHECKPOINT_FILE

State = dict[str, torch.Tensor]

#: Tag that keeps the client-sampling stream apart from every other random stream.
SAMPLING_TAG = 7_919


def sample_clients(seed: int, round_idx: int, num_clients: int, m: int) -> np.ndarray:
    """m distinct clients for this round, uniformly without replacement, from (seed, round) alone; sorted."""
    rng = np.random.default_rng([seed, SAMPLING_TAG, round_idx])
    return np.sort(rng.choice(num_clients, size=m, replace=False))


def lr_at(round_idx: int, lr: float, rounds: int, milestones: list[float], gamma: float) -> float:
    """Step schedule: lr x gamma after each milestone round int(frac * R) (the reference's R/2 and 3R/4)."""
    passed = sum(round_idx >= int(frac * rounds) for frac in milestones)
    return lr * gamma**passed


def clone_state(state: State) -> State:
    return {k: v.detach().clone() for k, v in state.items()}


def clone_store(store: dict[int, State]) -> dict[int, State]:
    return {c: clone_state(s) for c, s in store.items()}


class Server:
    """Global state, the per-client store, best-model selection, the evaluation and round history.

    Also the :class:`~orchestrator.algorithms.context.ServerContext` an algorithm's ``setup`` sees.
    """

    def __init__(self, initial_state: State, select: str = "best", model_description: str = "",
                 log: Callable[[str], None] = print):
        self.global_state = clone_state(initial_state)
        self.select = select
        self.model_description = model_description
        self._log = log
        self.round = 0  # rounds completed
        #: client id -> the part of the model it keeps (the algorithm's ``keeps``), as the client returned it
        self.store: dict[int, State] = {}
        self.history: list[dict[str, Any]] = []  # one record per evaluation
        self.round_log: list[dict[str, Any]] = []  # one record per round
        self.best: dict[str, Any] = {"round": None, "acc": -1.0, "state": None, "client_state": {}}
        self.personalization: dict[str, Any] | None = None

    def log(self, message: str) -> None:
        self._log(message)

    def keep(self, client: int, state: State | None) -> None:
        """Store what a client returned as its own state (None: nothing to keep)."""
        if state is not None:
            self.store[int(client)] = state

    # -- model selection -------------------------------------------------------------------------------------------
    def record_evaluation(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Add an evaluation of the current global model (after ``self.round`` rounds); keep it as the best model
        when its final-head accuracy is the best so far. Returns the history record."""
        record = {"round": self.round, **summary}
        if summary["acc_final"] > self.best["acc"]:
            self.best = {"round": self.round, "acc": summary["acc_final"], "state": clone_state(self.global_state),
                         "client_state": clone_store(self.store)}
        record["best_acc_final"] = self.best["acc"]
        record["best_round"] = self.best["round"]
        self.history.append(record)
        return record

    def selected_model(self) -> tuple[State, dict[int, State], int, str]:
        """(state, per-client store, rounds it completed, "best"|"final") handed to personalisation."""
        if self.select == "best" and self.best["state"] is not None:
            return self.best["state"], self.best.get("client_state", {}), self.best["round"], "best"
        return self.global_state, self.store, self.round, "final"

    # -- checkpoint state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "global_state": self.global_state, "client_state": self.store,
                "best": self.best, "history": self.history, "round_log": self.round_log,
                "personalization": self.personalization}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        own = self.global_state
        if state["global_state"].keys() != own.keys():
            raise ValueError("checkpoint model does not match the configured model (different state keys)")
        for key, value in state["global_state"].items():
            if value.shape != own[key].shape:
                raise ValueError(f"checkpoint tensor {key} has shape {tuple(value.shape)}, the configured model "
                                 f"{tuple(own[key].shape)} (other model or class count?)")
            own[key].copy_(value)
        migrate = _flatten_v1 if state.get("format", 2) == 1 else (lambda s: s)
        self.round = state["round"]
        self.store = _to_device(migrate(state["client_state"]), device)
        best = dict(state["best"])
        best["state"] = _to_device(best.get("state"), device)
        best["client_state"] = _to_device(migrate(best.get("client_state", {})), device)
        self.best = best
        self.history = list(state["history"])
        self.round_log = list(state["round_log"])
        self.personalization = state.get("personalization")


def load_selected_state(run_dir: Path, select: str, like: State, key: str, description: str) -> tuple[State, str]:
    """The model a finished run hands on -- its best-on-test state when ``select`` is best and it has one, else its
    final state -- checked against ``like`` (keys, shapes). Returns (state on like's devices, "best"|"final");
    ConfigError naming ``key`` if missing or mismatched."""
    if not (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{key}: no {CHECKPOINT_FILE} in {run_dir}; run the FedAvg cell first "
                          "(its run directory, e.g. runs/paper-fedavg-s100-f0.1-tau1), or set it to null")
    try:
        saved = load_checkpoint(run_dir, {})
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}") from None
    best = saved.get("best") or {}
    use_best = select == "best" and best.get("state") is not None
    state = best["state"] if use_best else saved["global_state"]
    if state.keys() != like.keys() or any(state[k].shape != like[k].shape for k in like):
        raise ConfigError(f"{key}: the model in {run_dir} is not this run's {description} (different state keys or "
                          "shapes); use the FedAvg run of the same model")
    return {k: v.to(like[k].device, like[k].dtype) for k, v in state.items()}, "best" if use_best else "final"


def _flatten_v1(store: dict) -> dict[int, State]:
    """Checkpoint format 1 nested a client's state by part name ({"head": {...}}): one flat state per client."""
    return {c: {k: t for part in parts.values() for k, t in part.items()} for c, parts in store.items()}


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj

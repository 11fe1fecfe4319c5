"""Execution backends: run the local updates of a round's clients and stream each result to a sink."""
from __future__ import annotations

from typing import Callable


class InProcessBackend:
    """Runs clients one after another in this process, on the federation's device (GPU when present)."""

    name = "inprocess"

    def run_clients(self, fed, round_idx: int, clients: list[int], lr: float, sink: Callable) -> None:
        epochs = fed.cfg.federation.local_epochs
        for client in clients:
            try:
                update = fed.algorithm.local_update(fed, client, fed.client_batches(client, round_idx, epochs), lr)
            except FloatingPointError as err:
                raise FloatingPointError(f"client {client}: {err}") from None
            sink(client, update)

    def close(self) -> None:
        pass


def make_backend(name: str, fed=None):
    if name == "inprocess":
        return InProcessBackend()
    if name == "flower":
        try:
            from .flower_backend import FlowerBackend
        except ImportError as err:
            raise RuntimeError(f"backend flower needs Flower: pip install -e \".[flower]\" ({err})") from None
        return FlowerBackend(fed)
    raise ValueError(f"unknown backend {name!r}")

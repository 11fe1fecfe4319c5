"""Execution backends: run the local updates of a round's clients and stream each result, in the given client order,
to the round loop.

Contract: ``backend.run_clients(jobs, global_state, on_result)`` runs every :class:`~orchestrator.algorithms.context.
ClientJob` (client, round, lr, the client's own kept state) from the round's ``global_state`` and calls
``on_result(ClientResult)`` once per job, in job order (so the aggregation's floating-point sum is the same on every
backend); ``close()`` releases what the backend started. Backends are registered by name; the Flower backend is
imported only when asked for (Flower is an optional dependency).
"""
from __future__ import annotations

import socket
from typing import Callable

from .algorithms import Algorithm
from .algorithms.context import ClientJob, State
from .clients import ClientResult, ClientRuntime, run_client, run_clients_batched
from .config import Config
from .errors import ConfigError


class InProcessBackend:
    """Runs clients one after another in this process, on the runtime's device (GPU when present)."""

    name = "inprocess"

    def __init__(self, runtime: ClientRuntime, algorithm: Algorithm):
        self.runtime, self.algorithm = runtime, algorithm

    def run_clients(self, jobs: list[ClientJob], global_state: State, on_result: Callable[[ClientResult], None]) -> None:
        for job in jobs:
            on_result(run_client(self.runtime, self.algorithm, job, global_state))

    def close(self) -> None:
        pass


class BatchedBackend:
    """Trains a round's clients as one computation (``lightning_modules.batched``), in the runtime's chunks
    (``batched.max_clients``, 0: all at once; halved when a chunk does not fit: ``orchestrator.chunks``), on the
    runtime's device."""

    name = "batched"

    def __init__(self, runtime: ClientRuntime, algorithm: Algorithm):
        if not algorithm.batchable:
            raise ValueError(f"algorithm {algorithm.name} cannot run on the batched engine; use backend inprocess")
        if runtime.chunks is None:
            raise ValueError("the batched backend needs a runtime built for it (backend: batched in its config)")
        self.runtime, self.algorithm = runtime, algorithm

    def run_clients(self, jobs: list[ClientJob], global_state: State, on_result: Callable[[ClientResult], None]) -> None:
        chunks = self.runtime.chunks  # at most batched.max_clients, halved when a chunk runs out of memory
        for results in chunks.run(jobs, lambda chunk: run_clients_batched(self.runtime, self.algorithm, chunk,
                                                                          global_state)):
            for result in results:
                on_result(result)

    def close(self) -> None:
        pass


def _inprocess(cfg: Config, run_dir, runtime: ClientRuntime, algorithm: Algorithm) -> InProcessBackend:
    return InProcessBackend(runtime, algorithm)


def _batched(cfg: Config, run_dir, runtime: ClientRuntime, algorithm: Algorithm) -> BatchedBackend:
    return BatchedBackend(runtime, algorithm)


def _flower(cfg: Config, run_dir, runtime: ClientRuntime, algorithm: Algorithm):
    try:
        from .flower_backend import FlowerBackend  # optional dependency: flwr[simulation]
    except ImportError as err:
        raise RuntimeError(f"backend flower needs Flower: pip install -e \".[flower]\" ({err})") from None
    return FlowerBackend(cfg, run_dir, runtime)


def _deployment(cfg: Config, run_dir, runtime: ClientRuntime, algorithm: Algorithm):
    raise RuntimeError("backend deployment is Flower's deployment runtime: start it with flwr run deploy/flower "
                       "(docs/flower.md), not with fl-sd")


#: backend name -> factory(cfg, run_dir, runtime, algorithm)
BACKENDS: dict[str, Callable] = {"inprocess": _inprocess, "batched": _batched, "flower": _flower,
                                 "deployment": _deployment}


#: Seconds to wait for a TCP answer at ``flower.ray_address`` before saying nothing answers there.
RAY_PROBE_TIMEOUT_S = 5.0


def check_ray_address(address: str | None, timeout: float = RAY_PROBE_TIMEOUT_S) -> None:
    """One clear line, within seconds, when nothing answers at a ``HOST:PORT`` Ray address: Ray itself retries for
    about a minute, warning, and the run then blamed the startup timeout. ``auto`` and null are left to Ray."""
    if not address or address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ConfigError(f"config key flower.ray_address: nothing answers at {address} ({why}, waited up to "
                          f"{timeout:g} s); start the Ray head there (ray start --head --port {port}) or set "
                          "flower.ray_address: null to start a local Ray") from None


def check_backend(cfg: Config) -> None:
    """What a backend needs from outside this process, checked before a run directory is made (runner.run)."""
    if cfg.backend == "flower":
        check_ray_address(cfg.flower.ray_address)


def make_backend(name: str, cfg: Config, run_dir, runtime: ClientRuntime, algorithm: Algorithm):
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None
    return factory(cfg, run_dir, runtime, algorithm)

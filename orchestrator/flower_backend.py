"""The scale-out backend: the same federation, its clients run by Flower's simulation engine (on Ray).

``backend: flower`` keeps everything the round loop owns -- client sampling, the learning-rate schedule, aggregation
(:class:`~orchestrator.aggregation.WeightedMean` via the round's ``sink``), evaluation, checkpoints -- in this process,
exactly as with ``backend: inprocess``. Only the clients' local updates move: each runs in a Flower ``ClientApp``
(:mod:`orchestrator.flower_app`) inside a Ray actor, through the same ``Algorithm.local_update`` code path, on batches
derived from (seed, round, client) by the same ``Federation.client_batches``. Results therefore match the in-process
backend bit for bit when the client's torch thread count matches (``num_cpus``; see docs/flower.md).

How the loop is shared: :class:`FlowerBackend` starts ``flwr.simulation.run_simulation`` in a background thread with a
``ServerApp`` whose main function serves round requests from a queue. ``run_clients`` puts one request per round (the
global state once, as ``ArrayRecord``\\ s, plus each sampled client's own state), the ServerApp sends one ``train``
Message per client to the Flower node whose ``partition-id`` is that client, and hands each reply back; replies are
streamed into ``sink`` in the order the clients were given (out-of-order replies wait in a small buffer), so the
floating-point sum of the aggregation is the in-process one. ``close()`` ends the ServerApp and the simulation.

Per-client state (e.g. FedPer's personal heads) goes back to the server with each reply and lives in
``fed.client_state``, as with the in-process backend: it is checkpointed and resumed with the run, the server needs it
to evaluate and personalise every client, and a node's Flower ``Context`` would have to travel to the actor with every
message anyway.

This module imports Flower lazily: :func:`validate_flower_options` runs without it (config validation).
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError

#: The ``flower:`` config options, with their defaults.
FLOWER_OPTIONS: dict[str, Any] = {
    "num_cpus": 1,  #: CPUs per simulated client (Ray actor resources); also the client's torch thread count
    "num_gpus": 0.0,  #: GPUs (a fraction shares one) per client; > 0 trains the clients on CUDA
    "ray_address": None,  #: join a running Ray cluster ("auto", "HOST:6379"); None starts a local Ray instance
    "ray_init_args": {},  #: further ray.init() keyword arguments (e.g. num_cpus, object_store_memory)
    "round_timeout": None,  #: seconds to wait for a round's replies; None waits as long as it takes
    "startup_timeout": 300.0,  #: seconds to wait for Ray, the actors and the Flower nodes to come up
    "verbose": False,  #: Flower's DEBUG logging
}

_NUMBER = (int, float)


def validate_flower_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The ``flower:`` options merged over :data:`FLOWER_OPTIONS`; a bad one raises a one-line ConfigError naming it."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(FLOWER_OPTIONS))
    if unknown:
        raise ConfigError(f"config key flower.{unknown[0]}: unknown Flower option; valid: {sorted(FLOWER_OPTIONS)}")
    merged = {**FLOWER_OPTIONS, **options}

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"config key flower.{key}: {message}, got {merged[key]!r}")

    def number(key: str) -> bool:
        return isinstance(merged[key], _NUMBER) and not isinstance(merged[key], bool)

    check(number("num_cpus") and merged["num_cpus"] > 0, "num_cpus", "must be a number > 0")
    check(number("num_gpus") and merged["num_gpus"] >= 0, "num_gpus", "must be a number >= 0")
    check(merged["ray_address"] is None or isinstance(merged["ray_address"], str), "ray_address",
          "must be a Ray address string (auto, HOST:6379, ray://HOST:10001) or null")
    check(isinstance(merged["ray_init_args"], dict) and "address" not in merged["ray_init_args"], "ray_init_args",
          "must be a mapping of ray.init() arguments (set the address with flower.ray_address)")
    check(merged["round_timeout"] is None or (number("round_timeout") and merged["round_timeout"] > 0),
          "round_timeout", "must be a number of seconds > 0 or null")
    check(number("startup_timeout") and merged["startup_timeout"] > 0, "startup_timeout", "must be seconds > 0")
    check(isinstance(merged["verbose"], bool), "verbose", "must be true or false")
    return merged


def client_resources(options: dict[str, Any]) -> dict[str, float]:
    """Ray resources of one simulated client (Flower's ``backend_config["client_resources"]``)."""
    return {"num_cpus": options["num_cpus"], "num_gpus": float(options["num_gpus"])}


def client_run_config(fed, options: dict[str, Any]) -> dict[str, Any]:
    """What every ClientApp message carries besides the round: where the run's config.yaml and partition.npz are (a
    ClientApp rebuilds its replica from them; written here when missing, e.g. in benchmarks), their fingerprint, and
    how the client runs (device, torch threads)."""
    from .runner import CONFIG_FILE, PARTITION_FILE

    run_dir = Path(fed.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / CONFIG_FILE).exists():
        (run_dir / CONFIG_FILE).write_text(fed.cfg.to_yaml())
    if not (run_dir / PARTITION_FILE).exists():
        fed.partition.save(run_dir / PARTITION_FILE)
    digest = hashlib.sha256((run_dir / CONFIG_FILE).read_bytes() + (run_dir / PARTITION_FILE).read_bytes())
    return {"run_dir": str(run_dir), "base_dir": os.getcwd(), "fingerprint": digest.hexdigest(),
            "device": "cuda" if options["num_gpus"] > 0 else "cpu", "threads": max(1, int(options["num_cpus"]))}


class FlowerBackend:
    """Runs the round's clients as Flower ClientApps on Flower's Ray-based simulation engine (see module docstring)."""

    name = "flower"

    def __init__(self, fed):
        self.options = validate_flower_options(fed.cfg.flower)
        try:
            from . import flower_app
        except ImportError as err:
            raise RuntimeError(f"backend flower needs Flower: pip install -e \".[flower]\" ({err})") from None
        self._app = flower_app
        self.fed = fed
        self.num_clients = fed.cfg.data.num_clients
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._seq = 0
        self._closed = False
        self._error: BaseException | None = None
        self._client_config = client_run_config(fed, self.options)
        self.node_of: dict[int, int] = {}

        if not self.options["verbose"]:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        backend_config: dict[str, Any] = {"client_resources": client_resources(self.options),
                                          "init_args": dict(self.options["ray_init_args"])}
        if self.options["ray_address"]:
            backend_config["init_args"]["address"] = self.options["ray_address"]
        server_app = flower_app.make_server_app(self._requests, self._replies, self.num_clients,
                                                timeout=float(self.options["startup_timeout"]))
        self._thread = threading.Thread(target=self._simulate, name="flower-simulation", daemon=True,
                                        args=(server_app, backend_config))
        self._thread.start()
        try:
            kind, payload = self._next_reply(self.options["startup_timeout"], "the Flower simulation to start")
            if kind != "ready":
                raise RuntimeError(f"Flower simulation did not start: {payload}")
        except BaseException:
            self.close(wait=10)
            raise
        self.node_of = payload

    # -- the simulation thread --------------------------------------------------------------------------------------
    def _simulate(self, server_app, backend_config) -> None:
        # Ray hides GPUs from num_gpus=0 actors today and warns that it will stop doing so; the clients' device is
        # chosen explicitly from flower.num_gpus either way.
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
        try:
            self._app.run_simulation(server_app=server_app, client_app=self._app.client_app,
                                     num_supernodes=self.num_clients, backend_config=backend_config,
                                     verbose_logging=self.options["verbose"])
        except BaseException as err:  # noqa: BLE001  (reported to the round loop)
            self._error = err
            self._replies.put(("error", err))
        else:
            self._replies.put(("stopped", None))

    def _next_reply(self, timeout: float | None, what: str):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"Flower backend: no reply within {timeout:g} s while waiting for {what} "
                                   "(raise flower.round_timeout / flower.startup_timeout?)")
            try:
                kind, payload = self._replies.get(timeout=wait)
            except queue.Empty:
                if not self._thread.is_alive() and self._replies.empty():
                    raise RuntimeError(f"Flower simulation ended while waiting for {what}: {self._error}") from None
                continue
            if kind == "error":
                raise RuntimeError(f"Flower simulation failed: {type(payload).__name__}: {payload}") from payload
            if kind == "stopped":
                raise RuntimeError(f"Flower simulation stopped while waiting for {what}")
            return kind, payload

    # -- the backend contract ---------------------------------------------------------------------------------------
    def run_clients(self, fed, round_idx: int, clients: list[int], lr: float, sink: Callable) -> None:
        if self._closed:
            raise RuntimeError("Flower backend is closed")
        app = self._app
        self._seq += 1
        seq = self._seq
        global_arrays = app.encode_state(fed.global_state)  # serialised once per round, shared by every message
        config = {**self._client_config, "round": int(round_idx), "lr": float(lr)}
        jobs = []
        for client in clients:
            content = app.train_content(config, int(client), global_arrays, fed.client_state.get(int(client), {}))
            jobs.append((self.node_of[int(client)], content))
        client_of = {node: client for client, node in self.node_of.items()}
        self._requests.put((seq, str(round_idx), jobs))

        done: dict[int, Any] = {}
        order = [int(c) for c in clients]
        nxt = 0
        while nxt < len(order):
            kind, payload = self._next_reply(self.options["round_timeout"], f"round {round_idx + 1}'s clients")
            if kind != "reply" or payload[0] != seq:
                continue  # a stale reply of an aborted round
            message = payload[1]
            client = client_of[message.metadata.src_node_id]
            done[client] = message
            while nxt < len(order) and order[nxt] in done:  # stream into the sink in the given client order
                c = order[nxt]
                update, state = app.decode_reply(done.pop(c), c, fed.device)
                if state is not None:
                    fed.client_state[c] = state
                sink(c, update)
                nxt += 1

    def close(self, wait: float = 60) -> None:
        """End the ServerApp (after the request in progress, if any), the simulation and Ray's actors."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        self._thread.join(timeout=wait)

"""The scale-out backend: the same federation, its clients run by Flower's simulation engine (on Ray).

``backend: flower`` keeps everything the round loop owns -- client sampling, the learning-rate schedule, aggregation,
evaluation, checkpoints, the per-client store -- in this process, exactly as with ``backend: inprocess``. Only the
clients' local updates move: each runs in a Flower ``ClientApp`` (:mod:`orchestrator.flower_app`) inside a Ray actor,
through the same :func:`orchestrator.clients.run_client` on the same client side (``ClientRuntime``, rebuilt in the
actor from the run directory), on batches derived from (seed, round, client). Results therefore match the in-process
backend bit for bit when the client's torch thread count matches (``flower.num_cpus``; see docs/flower.md).

How the loop is shared: :class:`FlowerBackend` starts ``flwr.simulation.run_simulation`` in a background thread with a
``ServerApp`` whose main function serves round requests from a queue. ``run_clients`` puts one request per round (the
global state once, as ``ArrayRecord``\\ s, plus each sampled client's own kept state), the ServerApp sends one
``train`` Message per client to the Flower node whose ``partition-id`` is that client, and hands each reply back;
replies are streamed to the round loop in the order of the jobs (out-of-order replies wait in a small buffer), so the
floating-point sum of the aggregation is the in-process one. ``close()`` ends the ServerApp and the simulation.

A client's own kept state (e.g. FedPer's personal head) travels with its job and comes back with its reply; the server
keeps it (``Server.store``), checkpoints it and needs it to evaluate and personalise every client.
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

from . import flower_app
from .algorithms.context import ClientJob, State
from .clients import ClientResult, ClientRuntime
from .config import Config, FlowerConfig
from .rundir import CONFIG_FILE, PARTITION_FILE


def client_resources(options: FlowerConfig) -> dict[str, float]:
    """Ray resources of one simulated client (Flower's ``backend_config["client_resources"]``)."""
    return {"num_cpus": options.num_cpus, "num_gpus": float(options.num_gpus)}


def client_run_config(cfg: Config, run_dir: Path, runtime: ClientRuntime) -> dict[str, Any]:
    """What every ClientApp message carries besides the round: where the run's config.yaml and partition.npz are (a
    ClientApp rebuilds its client side from them; written here when missing, e.g. in benchmarks), their fingerprint,
    and how the client runs (device, torch threads)."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / CONFIG_FILE).exists():
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    if not (run_dir / PARTITION_FILE).exists():
        runtime.partition.save(run_dir / PARTITION_FILE)
    digest = hashlib.sha256((run_dir / CONFIG_FILE).read_bytes() + (run_dir / PARTITION_FILE).read_bytes())
    options = cfg.flower
    return {"run_dir": str(run_dir), "base_dir": os.getcwd(), "fingerprint": digest.hexdigest(),
            "device": "cuda" if options.num_gpus > 0 else "cpu", "threads": max(1, int(options.num_cpus))}


class FlowerBackend:
    """Runs the round's clients as Flower ClientApps on Flower's Ray-based simulation engine (see module docstring)."""

    name = "flower"

    def __init__(self, cfg: Config, run_dir: Path, runtime: ClientRuntime):
        self.options = cfg.flower
        self._app = flower_app
        self.device = runtime.device
        self.num_clients = runtime.num_clients
        self._requests: queue.Queue = queue.Queue()
        self._replies: queue.Queue = queue.Queue()
        self._seq = 0
        self._closed = False
        self._error: BaseException | None = None
        self._client_config = client_run_config(cfg, run_dir, runtime)
        self.node_of: dict[int, int] = {}
        #: (round, client, worker) of every reply: where each client trained (``flower_app.worker_name``)
        self.placement: list[tuple[int, int, str]] = []

        if not self.options.verbose:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        backend_config: dict[str, Any] = {"client_resources": client_resources(self.options),
                                          "init_args": dict(self.options.ray_init_args)}
        if self.options.ray_address:
            backend_config["init_args"]["address"] = self.options.ray_address
        server_app = flower_app.make_server_app(self._requests, self._replies, self.num_clients,
                                                timeout=float(self.options.startup_timeout))
        self._thread = threading.Thread(target=self._simulate, name="flower-simulation", daemon=True,
                                        args=(server_app, backend_config))
        self._thread.start()
        try:
            kind, payload = self._next_reply(self.options.startup_timeout, "the Flower simulation to start")
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
                                     verbose_logging=self.options.verbose)
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
    def run_clients(self, jobs: list[ClientJob], global_state: State,
                    on_result: Callable[[ClientResult], None]) -> None:
        if self._closed:
            raise RuntimeError("Flower backend is closed")
        app = self._app
        self._seq += 1
        seq = self._seq
        global_arrays = app.encode_state(global_state)  # serialised once per round, shared by every message
        messages = []
        for job in jobs:
            config = {**self._client_config, "round": int(job.round), "lr": float(job.lr)}
            messages.append((self.node_of[job.client], app.train_content(config, job.client, global_arrays,
                                                                         job.own_state)))
        client_of = {node: client for client, node in self.node_of.items()}
        round_idx = jobs[0].round if jobs else 0
        self._requests.put((seq, str(round_idx), messages))

        done: dict[int, Any] = {}
        order = [job.client for job in jobs]
        nxt = 0
        while nxt < len(order):
            kind, payload = self._next_reply(self.options.round_timeout, f"round {round_idx + 1}'s clients")
            if kind != "reply" or payload[0] != seq:
                continue  # a stale reply of an aborted round
            message = payload[1]
            done[client_of[message.metadata.src_node_id]] = message
            while nxt < len(order) and order[nxt] in done:  # stream to the round loop in the jobs' order
                c = order[nxt]
                reply = done.pop(c)
                result = app.decode_reply(reply, c, self.device)
                self.placement.append((round_idx, c, app.worker_of(reply)))
                on_result(result)
                nxt += 1

    def close(self, wait: float = 60) -> None:
        """End the ServerApp (after the request in progress, if any), the simulation and Ray's actors."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(None)
        self._thread.join(timeout=wait)

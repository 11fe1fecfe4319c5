"""Flower's deployment runtime: the fl-sd Flower App (``deploy/flower/pyproject.toml``) that ``flwr run`` starts.

* :data:`server_app` runs on the SuperLink's side (in Flower's ``flwr-serverapp`` process). Its main function is the
  whole fl-sd run -- :func:`orchestrator.runner.run`: the round loop, client sampling, the learning-rate schedule,
  aggregation, evaluation, personalisation, checkpoints, ``--resume`` and tracking -- with a :class:`GridBackend`
  that sends each round's jobs to the SuperNodes through Flower's ``Grid``. The run config (``[tool.flwr.app.config]``,
  ``flwr run --run-config``) says which fl-sd config to run: ``config`` (a YAML path on the ServerApp's machine),
  ``overrides`` (fl-sd command-line overrides, one string), ``base-dir`` (directory relative paths are taken from) and
  ``resume`` (a run directory to continue).
* :data:`client_app` runs on each SuperNode (in ``flwr-clientapp`` processes). A SuperNode is one fl-sd client: its
  ``--node-config`` holds ``partition-id`` (the client id) and ``data-path`` (that client's shard, written by
  ``python -m orchestrator.shards``), optionally ``device`` and ``threads``. It trains only on that file; the config it
  trains with comes in each message, with the digest of the client's index sets the ServerApp expects, so a node with
  another partition's data is refused (one line naming both).

Dropout policy: **wait and retry the same job.** A client's update is a function of its job (client, round, lr, own
state) and the global state, so sending the job again gives the very same update: a SuperNode that drops out
mid-round and comes back (or is replaced by a node with the same ``partition-id`` and data) leaves the run's numbers
as if nothing had happened. The backend re-sends a client's job when Flower reports its node unavailable (missed
heartbeats) or the reply is lost, and -- with ``flower.retry_after`` -- when no reply came within that many seconds;
it looks the client's node up again first (a restarted SuperNode may have a new node id), the first reply counts and
later duplicates are dropped. ``flower.round_timeout`` bounds the wait: past it the run stops with an error, and the
checkpoint of the last completed checkpoint round lets ``resume`` continue. Skipping the client instead would change
the aggregate, hence every later number, and is not offered. A ClientApp that *fails* (an exception) stops the run.
"""
from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage telemetry from research runs unless asked for

import hashlib  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from . import flower_app  # noqa: E402
from .algorithms.context import ClientJob, State  # noqa: E402
from .build import make_algorithm, resolve_device  # noqa: E402
from .clients import ClientResult, ClientRuntime  # noqa: E402
from .config import Config, config_from_dict, load_config  # noqa: E402
from .runner import run  # noqa: E402
from .shards import load_shard, shard_digest, shard_runtime  # noqa: E402

PARTITION_ID = flower_app.PARTITION_ID
DATA_PATH = "data-path"
#: Flower's error codes of a message that did not reach its node or whose reply was lost: the job is sent again
LOST = {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
POLL_SECONDS = 0.05
QUERY_TIMEOUT = 60.0


# -- the ClientApp (one SuperNode = one client) --------------------------------------------------------------------
client_app = ClientApp()
_NODE: dict[str, Any] = {"key": None, "client_side": None}


def _node_data_path(context: Context) -> Path:
    if DATA_PATH not in context.node_config:
        raise ValueError(f"this SuperNode has no {DATA_PATH} in its --node-config: start it with --node-config "
                         f"'{PARTITION_ID}=<client> {DATA_PATH}=\"/path/client_<client>.npz\"'")
    return Path(str(context.node_config[DATA_PATH])).expanduser()


def _client_side(config: ConfigRecord, context: Context):
    """This process's (ClientRuntime, algorithm, shard), rebuilt only when the run's config or the data file change."""
    path = _node_data_path(context)
    key = (str(config["config_digest"]), str(path), path.stat().st_mtime_ns if path.exists() else 0)
    if _NODE["key"] == key:
        return _NODE["client_side"]
    _NODE.update(key=None, client_side=None)
    if "threads" in context.node_config:
        torch.set_num_threads(int(context.node_config["threads"]))
    cfg = config_from_dict(yaml.safe_load(str(config["config_yaml"])))
    algorithm = make_algorithm(cfg)
    shard = load_shard(path)
    runtime = shard_runtime(cfg, algorithm, shard, resolve_device(str(context.node_config.get("device", "auto"))))
    _NODE.update(key=key, client_side=(runtime, algorithm, shard))
    return runtime, algorithm, shard


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return flower_app.partition_reply(msg, context)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    client = flower_app.addressed_client(config, context, node="SuperNode")
    runtime, algorithm, shard = _client_side(config, context)
    if shard.client != client or shard.digest != str(config["digest"]):
        raise ValueError(f"the data of this SuperNode ({_node_data_path(context)}: client {shard.client}, digest "
                         f"{shard.digest}) is not client {client}'s data of this run (digest {config['digest']}): "
                         "export the shards with the run's config (python -m orchestrator.shards)")
    return flower_app.train_reply(msg, context, runtime, algorithm)


# -- the server side: a backend on Flower's Grid -------------------------------------------------------------------
def job_config(config_yaml: str, digest: str, job: ClientJob) -> dict[str, Any]:
    """The ``config`` record of a ``train`` message: the run's resolved config (YAML) and its digest (the ClientApp
    rebuilds its client side when it changes), the digest of the client's data, the round and the learning rate."""
    return {"config_yaml": config_yaml, "config_digest": hashlib.sha256(config_yaml.encode()).hexdigest()[:32],
            "digest": digest, "round": int(job.round), "lr": float(job.lr)}


class GridBackend:
    """Sends each round's jobs to the SuperNodes of their clients and streams the replies, in job order, to the round
    loop (the module docstring says what happens when a node drops out)."""

    name = "deployment"

    def __init__(self, grid: Grid, cfg: Config, runtime: ClientRuntime, log: Callable[[str], None] = print):
        self.grid, self.options, self.log = grid, cfg.flower, log
        self.device = runtime.device
        self.num_clients = runtime.num_clients
        self._config_yaml = cfg.to_yaml()
        self._digests = [shard_digest(runtime.partition, c) for c in range(self.num_clients)]
        self.node_of: dict[int, int] = {}  # client -> node id
        self._queried: set[int] = set()  # node ids whose partition id we know
        #: (round, client, worker) of every reply used; ``retries``: (round, client, why) of every job sent again
        self.placement: list[tuple[int, int, str]] = []
        self.retries: list[tuple[int, int, str]] = []
        self._discover(set(range(self.num_clients)), self.options.startup_timeout, "to start")

    def _discover(self, clients: set[int], timeout: float | None, what: str) -> None:
        """Ask every not yet known node its partition id until each of ``clients`` has a node."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            online = set(self.grid.get_node_ids())
            for client in [c for c, node in self.node_of.items() if node not in online]:
                del self.node_of[client]  # its node left: asked again when it is back (maybe with a new id)
            self._queried &= online
            new = sorted(online - self._queried)
            if new:
                queries = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in new]
                for reply in self.grid.send_and_receive(queries, timeout=QUERY_TIMEOUT):
                    if reply.has_error():
                        continue  # asked again on the next pass
                    self._queried.add(reply.metadata.src_node_id)
                    self.node_of[int(reply.content["node"]["partition_id"])] = reply.metadata.src_node_id
            missing = clients - set(self.node_of)
            if not missing:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"deployment: no SuperNode with partition-id {sorted(missing)} connected within "
                                   f"{timeout:g} s waiting for the federation {what} ({len(self.node_of)} of "
                                   f"{self.num_clients} clients have a node; raise flower.startup_timeout or start "
                                   "the missing SuperNodes)")
            time.sleep(0.5)

    def _send(self, job: ClientJob, global_arrays, group: str) -> str:
        config = job_config(self._config_yaml, self._digests[job.client], job)
        content = flower_app.train_content(config, job.client, global_arrays, job.own_state)
        message = Message(content, dst_node_id=self.node_of[job.client], message_type="train", group_id=group)
        return next(iter(self.grid.push_messages([message])))

    def run_clients(self, jobs: list[ClientJob], global_state: State,
                    on_result: Callable[[ClientResult], None]) -> None:
        if not jobs:
            return
        round_idx = jobs[0].round
        group = str(round_idx)
        global_arrays = flower_app.encode_state(global_state)
        job_of = {job.client: job for job in jobs}
        start = time.monotonic()
        sent: dict[str, int] = {}  # message id -> client (every message of this round still awaited)
        sent_at: dict[int, float] = {}
        for job in jobs:
            sent[self._send(job, global_arrays, group)] = job.client
            sent_at[job.client] = time.monotonic()
        done: dict[int, Message] = {}
        order, nxt = [job.client for job in jobs], 0
        while nxt < len(order):
            lost: dict[int, str] = {}
            for reply in self.grid.pull_messages(list(sent)):
                client = sent.pop(reply.metadata.reply_to_message_id, None)
                if client is None or client in done:
                    continue  # a duplicate of a retried job
                if reply.has_error():
                    if reply.error.code in LOST:
                        lost[client] = reply.error.reason
                        continue
                    raise RuntimeError(f"deployment: the ClientApp of client {client} failed: {reply.error.reason}")
                done[client] = reply
            retry_after = self.options.retry_after
            now = time.monotonic()
            if retry_after is not None:
                for client, at in sent_at.items():
                    if client not in done and client not in lost and now - at > retry_after:
                        lost[client] = f"no reply within flower.retry_after = {retry_after:g} s"
            for client, why in lost.items():
                self.log(f"round {round_idx + 1}: client {client}: {why}; sending its job again")
                self.retries.append((round_idx, client, why))
                self._discover({client}, self._time_left(start, round_idx), f"round {round_idx + 1}")
                sent[self._send(job_of[client], global_arrays, group)] = client
                sent_at[client] = time.monotonic()
            while nxt < len(order) and order[nxt] in done:  # stream to the round loop in the jobs' order
                c = order[nxt]
                reply = done[c]
                result = flower_app.decode_reply(reply, c, self.device)
                self.placement.append((round_idx, c, flower_app.worker_of(reply)))
                on_result(result)
                nxt += 1
            if nxt < len(order):
                self._time_left(start, round_idx)
                time.sleep(POLL_SECONDS)

    def _time_left(self, start: float, round_idx: int) -> float | None:
        timeout = self.options.round_timeout
        if timeout is None:
            return None
        left = timeout - (time.monotonic() - start)
        if left <= 0:
            raise TimeoutError(f"deployment: round {round_idx + 1} got no reply of every client within "
                               f"flower.round_timeout = {timeout:g} s (its last checkpoint can be resumed)")
        return left

    def close(self) -> None:
        pass


# -- the ServerApp -------------------------------------------------------------------------------------------------
server_app = ServerApp()


def run_config_overrides(run_config: dict) -> tuple[str, list[str], str | None]:
    """(config path, fl-sd overrides, resume run directory or None) from the Flower run config."""
    return (str(run_config.get("config", "")), shlex.split(str(run_config.get("overrides", ""))),
            str(run_config.get("resume", "")) or None)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    base_dir = str(context.run_config.get("base-dir", ""))
    if base_dir:
        os.chdir(base_dir)
    config_path, overrides, resume = run_config_overrides(dict(context.run_config))
    cfg = None if resume else load_config(config_path, [*overrides, "--backend", "deployment"])

    def grid_backend(cfg: Config, run_dir, runtime: ClientRuntime, algorithm) -> GridBackend:
        return GridBackend(grid, cfg, runtime)

    run(cfg, resume=resume, backend_factory=grid_backend)

"""Flower apps of the ``flower`` backend: the ClientApp that runs a client's local update, and the ServerApp bridge.

* :data:`client_app` answers two message types. ``query``: its node's ``partition-id`` (= the fl-sd client id), used
  once at start to map clients to Flower node ids. ``train``: one local update of client ``partition-id`` through
  :func:`orchestrator.clients.run_client`, on the client side only -- a :class:`~orchestrator.clients.ClientRuntime`
  and the algorithm, rebuilt from the run directory (``config.yaml`` + ``partition.npz``) once per Ray actor and
  cached, never per message. No server, no federation object exists in a ClientApp.
* :func:`make_server_app` builds the ServerApp whose main function serves the round requests of
  :class:`~orchestrator.flower_backend.FlowerBackend` (the round loop stays in ``orchestrator.runner``).

Message layout (all tensors travel as ``ArrayRecord``\\ s, lossless float32/int64 arrays):

==========  ==================  ===========================================================================
direction   key                 content
==========  ==================  ===========================================================================
to client   ``config``          ConfigRecord: client, round, lr, run_dir, base_dir, fingerprint, device, threads
to client   ``global``          ArrayRecord: the global model's state (every key: body and heads)
to client   ``own``             ArrayRecord: the client's own kept state (absent before its first round)
reply       ``result``          ConfigRecord: client, num_samples, num_steps, worker -- or client, error (NaN/Inf)
reply       ``metrics``         MetricRecord: the update's metrics (loss parts, accuracies, temperatures)
reply       ``body``/``head``   ArrayRecord: ``ClientUpdate.body_state`` / ``head_state`` (when returned)
reply       ``own``             ArrayRecord: the client's own state after the update (kept by the server)
==========  ==================  ===========================================================================
"""
from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage telemetry from research runs unless asked for

import logging  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation as _flwr_run_simulation  # noqa: E402

from fl_sd.data import Partition  # noqa: E402
from lightning_modules.client import ClientUpdate  # noqa: E402

from .algorithms.context import ClientJob  # noqa: E402
from .build import make_algorithm  # noqa: E402
from .clients import ClientResult, ClientRuntime, run_client  # noqa: E402
from .config import config_from_dict  # noqa: E402
from .rundir import CONFIG_FILE, PARTITION_FILE  # noqa: E402

PARTITION_ID = "partition-id"  # Flower's node_config key (simulation: 0..num_supernodes-1)
OWN_STATE = "own"
POLL_SECONDS = 0.01


class _DropRunSimulationDeprecation(logging.Filter):
    """``run_simulation`` is deprecated for ``flwr run`` app projects, which cannot hand the round loop to an outside
    caller; the warning says nothing actionable here (docs/flower.md explains the deployment path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation" not in record.getMessage()


logging.getLogger("flwr").addFilter(_DropRunSimulationDeprecation())


def run_simulation(**kwargs) -> None:
    _flwr_run_simulation(**kwargs)


# -- records -------------------------------------------------------------------------------------------------------
def encode_state(state: dict[str, torch.Tensor]) -> dict[str, Array]:
    """Serialise a state dict once; :func:`train_content` reuses the bytes in every message of the round."""
    return {k: Array(v.detach().cpu().numpy()) for k, v in state.items()}


def decode_state(record: ArrayRecord, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    return {k: t.to(device) if device is not None else t for k, t in record.to_torch_state_dict().items()}


def train_content(config: dict[str, Any], client: int, global_arrays: dict[str, Array],
                  own_state: dict[str, torch.Tensor] | None) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({**config, "client": client}),
                          "global": ArrayRecord(global_arrays)})
    if own_state is not None:
        content[OWN_STATE] = ArrayRecord(encode_state(own_state))
    return content


def decode_reply(message: Message, client: int, device) -> ClientResult:
    """The client's result on ``device``; raises for a failed client (FloatingPointError for a NaN/Inf loss)."""
    if message.has_error():
        raise RuntimeError(f"Flower ClientApp of client {client} failed: {message.error.reason}")
    content = message.content
    result = content["result"]
    if "error" in result:
        raise FloatingPointError(str(result["error"]))
    update = ClientUpdate(body_state=decode_state(content["body"], device),
                          head_state=decode_state(content["head"], device) if "head" in content else None,
                          num_samples=int(result["num_samples"]), num_steps=int(result["num_steps"]),
                          metrics={k: float(v) for k, v in content["metrics"].items()})
    own = decode_state(content[OWN_STATE], device) if OWN_STATE in content else None
    return ClientResult(client, update, own)


def worker_of(message: Message) -> str:
    """Where the reply's ClientApp ran (:func:`worker_name`); "" for a reply without it."""
    result = message.content["result"] if "result" in message.content else {}
    return str(result["worker"]) if "worker" in result else ""


def worker_name(context: Context) -> str:
    """``host/ray:<node id>`` inside a Ray actor (the simulation), ``host/flower:<node id>`` otherwise: which machine
    trained a client, recorded by the backends (``FlowerBackend.placement``)."""
    try:
        import ray  # optional: only the simulation engine runs ClientApps in Ray actors
    except ImportError:
        ray = None
    if ray is not None and ray.is_initialized():
        return f"{socket.gethostname()}/ray:{ray.get_runtime_context().get_node_id()}"
    return f"{socket.gethostname()}/flower:{context.node_id}"


# -- the ClientApp ---------------------------------------------------------------------------------------------------
client_app = ClientApp()
_REPLICA: dict[str, Any] = {"key": None, "client_side": None}


def _client_side(config: ConfigRecord) -> tuple[ClientRuntime, Any]:
    """This actor's (ClientRuntime, algorithm), rebuilt from the run directory when the run (fingerprint) changes;
    cached."""
    key = (config["run_dir"], config["fingerprint"], config["device"], int(config["threads"]))
    if _REPLICA["key"] == key:
        return _REPLICA["client_side"]
    _REPLICA.update(key=None, client_side=None)
    torch.set_num_threads(int(config["threads"]))  # the in-process run's thread count gives bitwise-equal results
    if Path(config["base_dir"]).is_dir():  # relative paths in the config (data.root, ...) are the driver's
        os.chdir(config["base_dir"])
    run_dir = Path(config["run_dir"])
    cfg = config_from_dict(yaml.safe_load((run_dir / CONFIG_FILE).read_text()))
    cfg.data.download = False  # the driver has the data; N actors must not race to download it
    algorithm = make_algorithm(cfg)
    runtime = ClientRuntime.from_config(cfg, algorithm, Partition.load(run_dir / PARTITION_FILE),
                                        torch.device(str(config["device"])))
    _REPLICA.update(key=key, client_side=(runtime, algorithm))
    return runtime, algorithm


def partition_reply(msg: Message, context: Context) -> Message:
    """The reply to a ``query`` message: which client's partition this node holds."""
    return Message(RecordDict({"node": ConfigRecord({"partition_id": int(context.node_config[PARTITION_ID])})}),
                   reply_to=msg)


def addressed_client(config, context: Context, node: str = "node") -> int:
    """The client a ``train`` message is for; refuses a message that reached the node of another partition."""
    client, partition = int(config["client"]), int(context.node_config[PARTITION_ID])
    if partition != client:
        raise ValueError(f"message for client {client} reached the {node} of partition {partition}")
    return client


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return partition_reply(msg, context)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    addressed_client(config, context)
    runtime, algorithm = _client_side(config)
    return train_reply(msg, context, runtime, algorithm)


def train_reply(msg: Message, context: Context, runtime: ClientRuntime, algorithm) -> Message:
    """Run the ``train`` message's job on this client side; the reply (the layout in the module docstring)."""
    content = msg.content
    config = content["config"]
    client = int(config["client"])
    global_state = decode_state(content["global"], runtime.device)
    own = decode_state(content[OWN_STATE], runtime.device) if OWN_STATE in content else None
    job = ClientJob(client, int(config["round"]), float(config["lr"]), own)
    try:
        result = run_client(runtime, algorithm, job, global_state)
    except FloatingPointError as err:  # reported to the round loop, which stops the run as the in-process backend
        return Message(RecordDict({"result": ConfigRecord({"client": client, "error": str(err)})}), reply_to=msg)
    update = result.update
    reply = RecordDict({
        "result": ConfigRecord({"client": client, "num_samples": int(update.num_samples),
                                "num_steps": int(update.num_steps), "worker": worker_name(context)}),
        "metrics": MetricRecord({k: float(v) for k, v in update.metrics.items()}),
        "body": ArrayRecord(update.body_state)})
    if update.head_state is not None:
        reply["head"] = ArrayRecord(update.head_state)
    if result.own_state is not None:
        reply[OWN_STATE] = ArrayRecord(result.own_state)
    return Message(reply, reply_to=msg)


# -- the ServerApp ---------------------------------------------------------------------------------------------------
def _wait_for_nodes(grid: Grid, num_nodes: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= num_nodes:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_nodes} Flower nodes registered within {timeout:g} s")
        time.sleep(0.05)


def _exchange(grid: Grid, messages: list[Message], on_reply) -> None:
    """Push ``messages``; call ``on_reply`` with each reply as soon as it arrives."""
    pending = set(grid.push_messages(messages))
    while pending:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
            on_reply(reply)
        if not replies:
            time.sleep(POLL_SECONDS)


def make_server_app(requests: queue.Queue, replies: queue.Queue, num_clients: int, timeout: float) -> ServerApp:
    """A ServerApp that maps clients to nodes, then sends each request's messages until it gets ``None``.

    Requests are ``(seq, group_id, [(node_id, RecordDict), ...])``; replies go out as ``("ready", {client: node})``,
    then ``("reply", (seq, Message))`` per client message.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = _wait_for_nodes(grid, num_clients, timeout)
        node_of: dict[int, int] = {}

        def on_query(reply: Message) -> None:
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} failed the query: {reply.error.reason}")
            node_of[int(reply.content["node"]["partition_id"])] = reply.metadata.src_node_id

        _exchange(grid, [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], on_query)
        if sorted(node_of) != list(range(num_clients)):
            raise RuntimeError(f"Flower nodes report partition ids {sorted(node_of)}, expected 0..{num_clients - 1}")
        replies.put(("ready", node_of))
        while (request := requests.get()) is not None:
            seq, group, jobs = request
            messages = [Message(content, dst_node_id=node, message_type="train", group_id=group)
                        for node, content in jobs]
            _exchange(grid, messages, lambda reply, seq=seq: replies.put(("reply", (seq, reply))))

    return app

"""The Flower backend: option validation, the ClientApp against the in-process update, and whole-run parity.

The parity tests start Flower's simulation engine (Ray); they need the ``flower`` extra (``pip install -e ".[flower]"``)
and are skipped without it. Option validation needs no Flower.
"""
from __future__ import annotations

import importlib.util
import math
import time

import pytest
import torch

from fed_fixtures import tiny_config
from orchestrator.algorithms import list_algorithms
from orchestrator.config import ConfigError
from orchestrator.federation import Federation
from orchestrator.flower_backend import FLOWER_OPTIONS, validate_flower_options

HAVE_FLOWER = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None
needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="Flower is not installed: pip install -e \".[flower]\" "
                                  "(flwr[simulation] with Ray) to test the flower backend")

#: Results fields that are wall-clock times, not training outcomes.
TIMING_KEYS = {"seconds"}


@pytest.fixture
def one_thread():
    """Bitwise parity needs the same torch thread count in the in-process run and in each client (num_cpus: 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def strip_timing(obj):
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


# -- options -------------------------------------------------------------------------------------------------------
def test_flower_options_defaults_and_errors():
    assert validate_flower_options({}) == FLOWER_OPTIONS
    opts = validate_flower_options({"num_cpus": 2, "num_gpus": 0.25, "ray_address": "auto"})
    assert opts["num_cpus"] == 2 and opts["num_gpus"] == 0.25 and opts["ray_address"] == "auto"
    with pytest.raises(ConfigError, match=r"^config key flower\.num_cpu: unknown Flower option") as err:
        validate_flower_options({"num_cpu": 1})
    assert "\n" not in str(err.value) and "num_cpus" in str(err.value)
    for bad in ({"num_cpus": 0}, {"num_gpus": -1}, {"num_cpus": "two"}, {"verbose": "yes"},
                {"ray_init_args": {"address": "auto"}}, {"round_timeout": 0}, {"ray_address": 6379}):
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=rf"^config key flower\.{key}: "):
            validate_flower_options(bad)


# -- the ClientApp, called directly (no Ray) --------------------------------------------------------------------------
def _train_message(fed, options, client, round_idx, lr):
    from flwr.app import Message, Metadata

    from orchestrator import flower_app
    from orchestrator.flower_backend import client_run_config

    config = {**client_run_config(fed, options), "round": round_idx, "lr": lr}
    content = flower_app.train_content(config, client, flower_app.encode_state(fed.global_state),
                                       fed.client_state.get(client, {}))
    # As the simulation delivers it (explicit metadata: no Flower run is active in this process).
    metadata = Metadata(run_id=1, message_id=f"m{client}-{round_idx}", src_node_id=1, dst_node_id=100 + client,
                        reply_to_message_id="", group_id=str(round_idx), created_at=time.time(), ttl=3600.0,
                        message_type="train")
    return Message(content=content, metadata=metadata)


def _context(client, num_clients):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=100 + client, node_config={"partition-id": client, "num-partitions": num_clients},
                   state=RecordDict(), run_config={})


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_flower
@pytest.mark.parametrize("algorithm", list_algorithms())
def test_client_app_update_equals_in_process_update(tmp_path, one_thread, algorithm):
    """Every algorithm: the ClientApp's update and the client state it hands back are the in-process ones, bit for
    bit, in the first round and in a later one (which starts from the client's own kept state, e.g. a personal head)."""
    from orchestrator import flower_app

    fed = Federation(tiny_config(tmp_path / "run", "--algorithm.name", algorithm), tmp_path / "run")
    options = validate_flower_options({})
    client, epochs = 3, fed.cfg.federation.local_epochs
    for round_idx in (0, 1):
        fed.round = round_idx
        lr = fed.lr(round_idx)
        reply = flower_app.client_app(_train_message(fed, options, client, round_idx, lr),
                                      _context(client, fed.cfg.data.num_clients))
        got, state = flower_app.decode_reply(reply, client, fed.device)
        want = fed.algorithm.local_update(fed, client, fed.client_batches(client, round_idx, epochs), lr)
        assert _equal_states(got.body_state, want.body_state)
        assert (got.head_state is None) == (want.head_state is None)
        assert want.head_state is None or _equal_states(got.head_state, want.head_state)
        assert got.metrics == want.metrics
        assert (got.num_samples, got.num_steps) == (want.num_samples, want.num_steps)
        kept = fed.client_state.get(client)
        assert (state is None) == (kept is None)
        if kept is not None:
            assert state.keys() == kept.keys() and all(_equal_states(state[p], kept[p]) for p in kept)
        fed.algorithm.apply_aggregate(fed, fed.algorithm.shared_state(fed, want))  # next round: a new global model


@needs_flower
def test_client_app_reports_divergence_and_wrong_node(tmp_path, one_thread):
    from orchestrator import flower_app

    fed = Federation(tiny_config(tmp_path / "run"), tmp_path / "run")
    options = validate_flower_options({})
    reply = flower_app.client_app(_train_message(fed, options, 2, 0, 1e30), _context(2, 10))
    with pytest.raises(FloatingPointError, match=r"^client 2: non-finite loss"):
        flower_app.decode_reply(reply, 2, fed.device)
    with pytest.raises(ValueError, match="reached the node of partition 5"):
        flower_app.client_app(_train_message(fed, options, 2, 0, 0.05), _context(5, 10))


# -- whole runs on Flower's simulation engine -------------------------------------------------------------------------
def _run_recording(monkeypatch, cfg):
    """runner.run(cfg), recording the clients the round loop hands to the backend each round."""
    from orchestrator import backends, runner

    sampled: list[list[int]] = []
    make = backends.make_backend

    def recording_backend(name, fed):
        backend = make(name, fed)
        inner = backend.run_clients

        def run_clients(fed, round_idx, clients, lr, sink):
            sampled.append(list(clients))
            return inner(fed, round_idx, clients, lr, sink)

        backend.run_clients = run_clients
        return backend

    monkeypatch.setattr(runner, "make_backend", recording_backend)
    results = runner.run(cfg)
    return results, sampled


@needs_flower
@pytest.mark.parametrize("algorithm", ["mhmd", "fedper"])
def test_flower_matches_in_process(tmp_path, monkeypatch, one_thread, algorithm):
    """The smoke federation (3 rounds, 5 of 10 clients a round, evaluations after rounds 2 and 3) on both backends: the
    same clients each round and the same numbers, bit for bit (every result compared with ==, timings excepted), and
    the same final global and per-client states. Personalisation is off: it runs on the driver with either backend,
    from the states compared here."""
    overrides = ["--algorithm.name", algorithm, "--federation.rounds", "3", "--personalization.enabled", "false"]
    local, local_sampled = _run_recording(monkeypatch, tiny_config(tmp_path / "inprocess", *overrides))
    flower, flower_sampled = _run_recording(monkeypatch, tiny_config(
        tmp_path / "flower", *overrides, "--backend", "flower", "--flower", '{"num_cpus": 1}'))
    assert flower_sampled == local_sampled and len(local_sampled) == 3
    assert strip_timing(flower) == strip_timing(local)
    assert math.isfinite(flower["global_final"]["acc_final"])

    from orchestrator.checkpoint import CHECKPOINT

    a = torch.load(tmp_path / "inprocess" / CHECKPOINT, weights_only=False)["state"]
    b = torch.load(tmp_path / "flower" / CHECKPOINT, weights_only=False)["state"]
    assert strip_timing(b["round_log"]) == strip_timing(a["round_log"])  # train metrics of every round
    assert b["history"] == a["history"]
    for key, value in a["global_state"].items():
        assert torch.equal(b["global_state"][key], value), key
    assert a["client_state"].keys() == b["client_state"].keys()
    if algorithm == "fedper":
        assert len(b["client_state"]) >= 5  # personal heads came back from the ClientApps and were kept
    for client, parts in a["client_state"].items():
        for part, state in parts.items():
            assert all(torch.equal(b["client_state"][client][part][k], v) for k, v in state.items())


def test_flower_options_checked_with_the_config(tmp_path):
    """A bad flower option stops the run at config validation, before any data is read."""
    with pytest.raises(ConfigError, match=r"^config key flower\.num_cpu: unknown Flower option"):
        tiny_config(tmp_path / "run", "--backend", "flower", "--flower", '{"num_cpu": 1}')
    with pytest.raises(ConfigError, match=r"^config key flower\.num_gpus: must be a number >= 0"):
        tiny_config(tmp_path / "run", "--flower", '{"num_gpus": -1}')

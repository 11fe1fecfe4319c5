"""The Flower backend: option validation, the ClientApp against the in-process update, and whole-run parity.

The parity tests start Flower's simulation engine (Ray); they need the ``flower`` extra (``pip install -e ".[flower]"``)
and are skipped without it. Option validation needs no Flower.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import math
import time

import pytest
import torch

from fed_fixtures import REPO, tiny_config
from golden_runs import strip_timing
from orchestrator.algorithms import list_algorithms
from orchestrator.algorithms.context import ClientJob
from orchestrator.clients import run_client
from orchestrator.errors import ConfigError
from orchestrator.federation import Federation

HAVE_FLOWER = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None
needs_flower = pytest.mark.skipif(not HAVE_FLOWER, reason="Flower is not installed: pip install -e \".[flower]\" "
                                  "(flwr[simulation] with Ray) to test the flower backend")

# -- the ClientApp, called directly (no Ray) --------------------------------------------------------------------------
def _train_message(fed, client, round_idx, lr, own=None):
    from flwr.app import Message, Metadata

    from orchestrator import flower_app
    from orchestrator.flower_backend import client_run_config

    config = {**client_run_config(fed.cfg, fed.run_dir, fed.runtime), "round": round_idx, "lr": lr}
    content = flower_app.train_content(config, client, flower_app.encode_state(fed.server.global_state), own)
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
    """Every algorithm: the ClientApp's update and the own state it hands back are the in-process ones, bit for bit,
    in the first round and in a later one (which starts from the client's own kept state, e.g. a personal head)."""
    from orchestrator import flower_app

    fed = Federation(tiny_config(tmp_path / "run", "--algorithm.name", algorithm), tmp_path / "run")
    client, own = 3, None
    for round_idx in (0, 1):
        lr = fed.lr(round_idx)
        reply = flower_app.client_app(_train_message(fed, client, round_idx, lr, own),
                                      _context(client, fed.cfg.data.num_clients))
        got = flower_app.decode_reply(reply, client, fed.device)
        want = run_client(fed.runtime, fed.algorithm, ClientJob(client, round_idx, lr, own), fed.server.global_state)
        assert _equal_states(got.update.body_state, want.update.body_state)
        assert (got.update.head_state is None) == (want.update.head_state is None)
        assert want.update.head_state is None or _equal_states(got.update.head_state, want.update.head_state)
        assert got.update.metrics == want.update.metrics
        assert (got.update.num_samples, got.update.num_steps) == (want.update.num_samples, want.update.num_steps)
        assert (got.own_state is None) == (want.own_state is None)
        assert want.own_state is None or _equal_states(got.own_state, want.own_state)
        own = want.own_state
        fed.algorithm.apply_aggregate(fed.server.global_state, fed.algorithm.shared_state(want.update))


@needs_flower
def test_client_app_builds_only_the_client_side(tmp_path, one_thread, monkeypatch):
    """A ClientApp never constructs a server or a Federation: it answers with those made unconstructible."""
    from orchestrator import federation, flower_app, server

    fed = Federation(tiny_config(tmp_path / "run"), tmp_path / "run")
    message = _train_message(fed, 2, 0, 0.05)

    def forbidden(*args, **kwargs):
        raise AssertionError("the ClientApp built a server-side object")

    monkeypatch.setattr(federation.Federation, "__init__", forbidden)
    monkeypatch.setattr(server.Server, "__init__", forbidden)
    flower_app._REPLICA.update(key=None, client_side=None)  # no cached client side from an earlier test
    result = flower_app.decode_reply(flower_app.client_app(message, _context(2, 10)), 2, fed.device)
    assert result.update.num_samples == fed.runtime.num_train_samples(2)


@needs_flower
def test_client_app_reports_divergence_and_wrong_node(tmp_path, one_thread):
    from orchestrator import flower_app

    fed = Federation(tiny_config(tmp_path / "run"), tmp_path / "run")
    reply = flower_app.client_app(_train_message(fed, 2, 0, 1e30), _context(2, 10))
    with pytest.raises(FloatingPointError, match=r"^client 2: non-finite loss"):
        flower_app.decode_reply(reply, 2, fed.device)
    with pytest.raises(ValueError, match="reached the node of partition 5"):
        flower_app.client_app(_train_message(fed, 2, 0, 0.05), _context(5, 10))


# -- whole runs on Flower's simulation engine -------------------------------------------------------------------------
def _run_recording(monkeypatch, cfg):
    """runner.run(cfg), recording the clients the round loop hands to the backend each round."""
    from orchestrator import backends, runner

    sampled: list[list[int]] = []
    make = backends.make_backend

    def recording_backend(*args):
        backend = make(*args)
        inner = backend.run_clients

        def run_clients(jobs, global_state, on_result):
            sampled.append([job.client for job in jobs])
            return inner(jobs, global_state, on_result)

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
    if algorithm == "fedper":  # personal heads: per-client state has to travel back from the ClientApps
        overrides += ["--algorithm.fedper.personal_heads", "true"]
    local, local_sampled = _run_recording(monkeypatch, tiny_config(tmp_path / "inprocess", *overrides))
    flower, flower_sampled = _run_recording(monkeypatch, tiny_config(
        tmp_path / "flower", *overrides, "--backend", "flower", "--flower.num_cpus", "1"))
    assert flower_sampled == local_sampled and len(local_sampled) == 3
    assert strip_timing(flower) == strip_timing(local)
    assert math.isfinite(flower["global_final"]["acc_final"])

    from orchestrator.rundir import CHECKPOINT_FILE as CHECKPOINT

    a = torch.load(tmp_path / "inprocess" / CHECKPOINT, weights_only=False)["state"]
    b = torch.load(tmp_path / "flower" / CHECKPOINT, weights_only=False)["state"]
    assert strip_timing(b["round_log"]) == strip_timing(a["round_log"])  # train metrics of every round
    assert b["history"] == a["history"]
    for key, value in a["global_state"].items():
        assert torch.equal(b["global_state"][key], value), key
    assert a["client_state"].keys() == b["client_state"].keys()
    if algorithm == "fedper":
        assert len(b["client_state"]) >= 5  # personal heads came back from the ClientApps and were kept
    for client, own in a["client_state"].items():
        assert own.keys() == b["client_state"][client].keys()
        assert all(torch.equal(b["client_state"][client][k], v) for k, v in own.items())


def test_flower_options_checked_with_the_config(tmp_path):
    """A bad flower option stops the run at config validation, before any data is read."""
    with pytest.raises(ConfigError, match=r"config key flower\.num_cpu: unknown key"):
        tiny_config(tmp_path / "run", "--backend", "flower", "--flower", '{"num_cpu": 1}')
    with pytest.raises(ConfigError, match=r"^config key flower\.num_gpus: must be a number >= 0"):
        tiny_config(tmp_path / "run", "--flower.num_gpus", "-1")
    for key, value in (("num_cpus", "0"), ("round_timeout", "0"), ("startup_timeout", "-1")):
        with pytest.raises(ConfigError, match=rf"^config key flower\.{key}: "):
            tiny_config(tmp_path / "run", f"--flower.{key}", value)
    with pytest.raises(ConfigError, match=r"^config key flower\.ray_init_args: "):
        tiny_config(tmp_path / "run", "--flower.ray_init_args", "{address: auto}")



@needs_flower
def test_unreachable_ray_address_is_one_line_naming_the_key(tmp_path):
    """Nothing listening at flower.ray_address: one line naming the key and the fix (Ray would retry for a minute
    and the run then blamed its startup timeout); a malformed address is refused with the config."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.run([sys.executable, str(REPO / "orchestrator" / "main.py"), "--config", "configs/smoke.yaml",
                           "--backend", "flower", "--flower.ray_address", f"127.0.0.1:{port}", "--run_dir",
                           str(tmp_path / "run"), "--tracking.progress", "false"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: config key flower.ray_address: nothing answers at 127.0.0.1:{port}")
    assert "ray start --head" in lines[0] and "timeout" not in lines[0].replace("waited up to", "")
    assert not (tmp_path / "run").exists()  # refused before a run directory is made: nothing to --resume
    for bad in ("localhost", "host:port", "http://x:1"):
        with pytest.raises(ConfigError, match=r"^config key flower\.ray_address: must be auto, HOST:PORT"):
            tiny_config(tmp_path / "r", "--flower.ray_address", bad)

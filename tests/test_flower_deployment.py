"""Flower's deployment runtime, for real, on loopback: one ``flower-superlink``, one ``flower-supernode`` per client,
``flwr run deploy/flower`` (deploy/local_federation.py starts them on free ports and stops every process at the end).

* With TLS and SuperNode authentication, configs/smoke.yaml on 3 clients (3 SuperNodes, each holding only its own
  exported shard) gives the in-process run's results bit for bit (one torch thread on both sides), while a SuperNode
  whose key was never registered and one that trusts another CA are refused.
* A SuperNode killed mid-round (with its ClientApp) and started again: its job is sent again and the run's results
  are still the in-process ones.

Each test starts Flower's processes (a few Python start-ups per message on this machine): about a minute or two each.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from fed_fixtures import REPO, tiny_config
from golden_runs import strip_timing
from test_flower import needs_flower

sys.path.insert(0, str(REPO / "deploy"))

#: smoke.yaml on 3 clients (IID: 10 classes do not split into shards for 3), 2 of them a round, 2 rounds
SMOKE3 = ["--data.num_clients", "3", "--data.partition", "iid", "--federation.client_fraction", "0.67",
          "--federation.rounds", "2", "--personalization.epochs", "1"]
QUIET = "--tracking.progress false --tracking.wandb disabled --tracking.plots false"
RESULT_KEYS = ("rounds", "best_round", "best_acc_final", "global_final", "global_best", "personalized")


def _reference_and_shards(tmp_path: Path, overrides: list[str]):
    """The in-process run's results, and every client's shard exported from the same config."""
    from orchestrator import runner
    from orchestrator.shards import export_shards

    cfg = tiny_config(tmp_path / "inprocess", *overrides)
    local = runner.run(cfg)
    shards = export_shards(cfg, tmp_path / "shards")
    return local, shards


def _run_config(run_dir: Path, overrides: list[str]) -> dict[str, str]:
    return {"config": "configs/smoke.yaml", "base-dir": str(REPO),
            "overrides": f"{' '.join(overrides)} {QUIET} --run_dir {run_dir}"}


def _same_results(got: dict, want: dict) -> None:
    for key in RESULT_KEYS:
        assert strip_timing(got[key]) == strip_timing(want[key]), key


def _online_nodes(fed) -> list[dict]:
    listing = json.loads(fed.flwr("supernode", "list", "--format", "json"))
    return [n for n in listing.get("nodes", []) if str(n.get("status", "")).lower() == "online"]


@needs_flower
def test_secure_deployment_matches_in_process_and_refuses_strangers(tmp_path, one_thread):
    from local_federation import LocalFederation
    from make_credentials import make_tls

    local, shards = _reference_and_shards(tmp_path, SMOKE3)
    other_ca = tmp_path / "other-ca"
    other_ca.mkdir()
    make_tls(other_ca, ["127.0.0.1"])
    with LocalFederation(tmp_path / "flower", secure=True) as fed:
        fed.start_superlink()
        for c, shard in enumerate(shards):
            fed.start_supernode(c, shard)
        stranger_key = fed.supernode_key("stranger", register=False)
        stranger = fed.start_supernode(0, shards[0], name="stranger", key=stranger_key, max_retries=2,
                                       max_wait_time=30)
        wrong_ca = fed.start_supernode(1, shards[1], name="wrong_ca", root_certificates=other_ca / "ca.crt",
                                       max_retries=2, max_wait_time=30)
        out = fed.run(_run_config(tmp_path / "deployed", SMOKE3), timeout=600)
        assert "personalised accuracy" in out, out[-3000:]
        online = _online_nodes(fed)
        deadline = time.monotonic() + 60
        while (stranger.poll() is None or wrong_ca.poll() is None) and time.monotonic() < deadline:
            time.sleep(0.5)
        stranger_log, wrong_ca_log = fed.log("stranger"), fed.log("wrong_ca")
    deployed = json.loads((tmp_path / "deployed" / "results.json").read_text())
    _same_results(deployed, local)
    assert len(online) == 3, online  # the three registered nodes, not the stranger
    assert stranger.returncode not in (None, 0) and wrong_ca.returncode not in (None, 0)
    assert "Failed to activate SuperNode" in stranger_log, stranger_log[-2000:]  # the SuperLink refused its key
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca_log, wrong_ca_log[-2000:]  # TLS: it cannot trust the SuperLink


@needs_flower
def test_supernode_dropping_out_mid_round_is_retried_without_changing_results(tmp_path, one_thread):
    from local_federation import LocalFederation

    overrides = ["--data.num_clients", "2", "--data.shards_per_client", "5", "--federation.client_fraction", "1.0",
                 "--federation.rounds", "2", "--personalization.enabled", "false"]
    local, shards = _reference_and_shards(tmp_path, overrides)
    with LocalFederation(tmp_path / "flower", secure=True) as fed:
        fed.start_superlink()
        key = fed.supernode_key("supernode_1")
        fed.start_supernode(0, shards[0])
        fed.start_supernode(1, shards[1], key=key)
        outcome: dict[str, str] = {}
        runner = threading.Thread(target=lambda: outcome.update(out=fed.run(_run_config(tmp_path / "deployed",
                                                                                         overrides), timeout=600)))
        runner.start()
        deadline = time.monotonic() + 300
        while "Receiving: train message" not in fed.log("supernode_1"):  # round 1's job reached client 1
            assert time.monotonic() < deadline and runner.is_alive(), fed.log("supernode_1")[-2000:]
            time.sleep(0.1)
        fed.stop_process("supernode_1", signal.SIGKILL)  # the node and its ClientApp vanish mid-round
        # The same node (same key) comes back. The SuperLink refuses to activate a key whose node it still thinks
        # online, until two missed heartbeats (~60 s) mark it offline; so, like a supervisor would, restart it until
        # it is accepted.
        attempt = 0
        while True:
            attempt += 1
            name = f"supernode_1_back{attempt}"
            node = fed.start_supernode(1, shards[1], name=name, key=key)
            while node.poll() is None and "SuperNode ID" not in fed.log(name):
                time.sleep(0.2)
            if node.poll() is None:
                break
            assert time.monotonic() < deadline, fed.log(name)[-2000:]
            time.sleep(5)
        runner.join(timeout=600)
        assert not runner.is_alive()
    out = outcome["out"]
    assert "round 1: client 1: Error: Node Unavailable" in out and "sending its job again" in out, out[-3000:]
    deployed = json.loads((tmp_path / "deployed" / "results.json").read_text())
    _same_results(deployed, local)


def test_deployment_backend_is_not_a_command_line_backend(tmp_path):
    """backend: deployment only exists under flwr run; fl-sd says so in one line."""
    from orchestrator.backends import make_backend

    with pytest.raises(RuntimeError, match=r"^backend deployment is Flower's deployment runtime: start it with flwr run"):
        make_backend("deployment", tiny_config(tmp_path / "run"), tmp_path / "run", None, None)


"""The Flower backend on a real two-node Ray cluster on this machine (``flower.ray_address``).

A head node and a second node (separate raylets, object stores and worker processes, bound to 127.0.0.1) are started
with Ray's own cluster utilities in a private Ray temp directory, so no other Ray user on the machine can attach to
them (nor they to another's); they are always shut down. The nodes bind to 127.0.0.2 (loopback): Ray rewrites a
127.0.0.1 cluster address to the machine's network address before connecting, which a loopback-bound cluster does not
listen on; the driver is told its own node address (``flower.ray_init_args: {_node_ip_address: 127.0.0.2}``). Each node offers one CPU and each client asks for one, so
Flower's actor pool has one actor per node and the round's clients are spread over both.
"""
from __future__ import annotations

import shutil
import tempfile

import pytest
import torch

from fed_fixtures import tiny_config
from golden_runs import strip_timing
from test_flower import needs_flower

OBJECT_STORE = 80 * 1024 * 1024  # bytes per node: Ray's minimum is 75 MiB
LOOPBACK = "127.0.0.2"


@pytest.fixture
def two_node_cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)  # the cluster's address file too: ray.init() elsewhere never sees it
    node_args = {"num_cpus": 1, "node_ip_address": LOOPBACK, "object_store_memory": OBJECT_STORE}
    cluster = Cluster(shutdown_at_exit=True)
    try:
        cluster.add_node(**node_args, include_dashboard=False)
        cluster.add_node(**node_args)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@needs_flower
def test_two_node_ray_cluster_matches_in_process(tmp_path, monkeypatch, one_thread, two_node_cluster):
    """The smoke federation (3 rounds, 5 of 10 clients) on a two-node cluster: clients trained on both nodes (the
    Ray node id every reply reports), and every result and final state equal to the in-process run, bit for bit."""
    from orchestrator import backends, runner
    from orchestrator.rundir import CHECKPOINT_FILE

    made = []
    make = backends.make_backend

    def keep_backend(*args):
        made.append(make(*args))
        return made[-1]

    monkeypatch.setattr(runner, "make_backend", keep_backend)
    overrides = ["--federation.rounds", "3", "--personalization.enabled", "false", "--algorithm.name", "fedper"]
    local = runner.run(tiny_config(tmp_path / "inprocess", *overrides))
    cluster = runner.run(tiny_config(tmp_path / "cluster", *overrides, "--backend", "flower",
                                     "--flower.num_cpus", "1", "--flower.ray_address", two_node_cluster.address,
                                     "--flower.ray_init_args", f"{{_node_ip_address: {LOOPBACK}}}",
                                     "--flower.startup_timeout", "120"))
    assert strip_timing(cluster) == strip_timing(local)

    placement = made[-1].placement
    assert len(placement) == 15  # 3 rounds x 5 clients, one reply each
    ray_nodes = {node["NodeID"] for node in two_node_cluster.global_state.node_table()}
    used = {worker.rsplit("/ray:", 1)[-1] for _, _, worker in placement}
    assert used == ray_nodes and len(ray_nodes) == 2, (used, ray_nodes)

    a = torch.load(tmp_path / "inprocess" / CHECKPOINT_FILE, weights_only=False)["state"]
    b = torch.load(tmp_path / "cluster" / CHECKPOINT_FILE, weights_only=False)["state"]
    for key, value in a["global_state"].items():
        assert torch.equal(b["global_state"][key], value), key
    for client, own in a["client_state"].items():
        assert all(torch.equal(b["client_state"][client][k], v) for k, v in own.items())

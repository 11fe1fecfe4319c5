"""Per-client shards (orchestrator/shards.py) and the deployment ClientApp, called directly (no Flower processes)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fed_fixtures import tiny_config
from fl_sd.data import DataError
from orchestrator.algorithms.context import ClientJob
from orchestrator.build import load_data, make_algorithm
from orchestrator.clients import run_client
from orchestrator.federation import Federation
from orchestrator.shards import export_shards, load_shard, main, shard_digest, shard_runtime
from test_flower import needs_flower


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algorithm", ["mhmd", "fedper", "perfedavg"])
def test_shard_runtime_update_equals_full_runtime(tmp_path, one_thread, algorithm):
    """A runtime holding one client's shard gives that client's update of the full runtime, bit for bit (Per-FedAvg
    also draws from the client's test split)."""
    cfg = tiny_config(tmp_path / "run", "--algorithm.name", algorithm)
    fed = Federation(cfg, tmp_path / "run")
    files = export_shards(cfg, tmp_path / "shards", fed.partition)
    client = 2
    shard = load_shard(files[client])
    assert (shard.client, shard.num_clients) == (client, cfg.data.num_clients)
    assert len(shard.dataset.train_labels) == fed.runtime.num_train_samples(client)
    full = load_data(cfg)
    assert np.array_equal(shard.dataset.train_labels, full.train_labels[fed.partition.train[client]])
    assert np.array_equal(shard.dataset.test_images, full.test_images[fed.partition.test[client]])
    algo = make_algorithm(cfg)
    small = shard_runtime(cfg, algo, shard, fed.device)
    job = ClientJob(client, 1, 0.05, None)
    got = run_client(small, algo, job, fed.server.global_state)
    want = run_client(fed.runtime, fed.algorithm, job, fed.server.global_state)
    assert _equal(got.update.body_state, want.update.body_state)
    assert got.update.metrics == want.update.metrics
    assert (got.own_state is None) == (want.own_state is None)
    assert want.own_state is None or _equal(got.own_state, want.own_state)


def test_shards_command_and_errors(tmp_path, capsys):
    assert main(["--config", "configs/smoke.yaml", "--data.num_clients", "3", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shards_per_client=2 x num_clients=3") and err.count("\n") == 1
    with pytest.raises(Exception, match=r"client data .* does not exist; fix: export it with python -m orchestrator"):
        load_shard(tmp_path / "client_9.npz")
    bad = tmp_path / "client_0.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match=r"client data .* is not a readable .npz file .*; fix: export it again$"):
        load_shard(bad)
    np.savez(bad, format_version=np.int64(1), client=np.int64(0))
    with pytest.raises(DataError, match=r"client data .* lacks key\(s\) \['num_clients'.*; fix: export it again$"):
        load_shard(bad)


@needs_flower
def test_deployment_client_app_trains_only_on_its_shard_and_refuses_another(tmp_path, one_thread):
    from flwr.app import Context, Message, Metadata, RecordDict

    from orchestrator import flower_app, flower_deployment

    cfg = tiny_config(tmp_path / "run")
    fed = Federation(cfg, tmp_path / "run")
    files = export_shards(cfg, tmp_path / "shards", fed.partition)

    def message(client):
        job = ClientJob(client, 0, 0.05, None)
        config = flower_deployment.job_config(cfg.to_yaml(), shard_digest(fed.partition, client), job)
        content = flower_app.train_content(config, client, flower_app.encode_state(fed.server.global_state), None)
        meta = Metadata(run_id=1, message_id=f"m{client}", src_node_id=1, dst_node_id=9, reply_to_message_id="",
                        group_id="0", created_at=time.time(), ttl=3600.0, message_type="train")
        return Message(content=content, metadata=meta)

    def context(partition, path):
        return Context(run_id=1, node_id=9, node_config={"partition-id": partition, "data-path": str(path)},
                       state=RecordDict(), run_config={})

    reply = flower_deployment.client_app(message(1), context(1, files[1]))
    got = flower_app.decode_reply(reply, 1, fed.device)
    want = run_client(fed.runtime, fed.algorithm, ClientJob(1, 0, 0.05, None), fed.server.global_state)
    assert _equal(got.update.body_state, want.update.body_state)
    assert flower_app.worker_of(reply).endswith("/flower:9")
    with pytest.raises(ValueError, match=r"is not client 1's data of this run"):
        flower_deployment.client_app(message(1), context(1, files[2]))  # partition 1, but client 2's file
    with pytest.raises(ValueError, match=r"has no data-path in its --node-config"):
        flower_deployment.client_app(message(1), Context(run_id=1, node_id=9, node_config={"partition-id": 1},
                                                         state=RecordDict(), run_config={}))

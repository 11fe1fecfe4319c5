"""The round loop (orchestrator/federation.py): the algorithms' defining rules over real rounds, the aggregate, and
end-to-end runs."""
from __future__ import annotations

import pytest
import torch

from fed_fixtures import SHARED_DATA, make_fed, snapshot, tiny_config
from orchestrator.algorithms.context import ClientJob
from orchestrator.backends import InProcessBackend
from orchestrator.runner import run


def backend_of(fed):
    return InProcessBackend(fed.runtime, fed.algorithm)


# -- the algorithms' defining rules -------------------------------------------------------------------------------
def test_fedbabu_never_changes_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedbabu")
    g, head_keys, body_keys = fed.server.global_state, fed.runtime.head_keys, fed.runtime.body_keys
    heads0, body0 = snapshot(g, head_keys), snapshot(g, body_keys)
    backend = backend_of(fed)
    for _ in range(2):
        fed.run_round(backend)
    for k in head_keys:
        assert torch.equal(g[k], heads0[k]), k
    changed = [k for k in body_keys if not torch.equal(g[k], body0[k])]
    assert len(changed) > len(body_keys) // 2
    assert not any("running" in k for k in body_keys)  # FedBABU's BN: no running statistics


def test_mhmd_freezes_heads_and_tracks_bn(tmp_path):
    fed = make_fed(tmp_path)  # smoke = mhmd
    g, head_keys = fed.server.global_state, fed.runtime.head_keys
    heads0 = snapshot(g, head_keys)
    fed.run_round(backend_of(fed))
    assert all(torch.equal(g[k], heads0[k]) for k in head_keys)
    running = [k for k in fed.runtime.body_keys if k.endswith("running_mean")]
    assert running and not torch.equal(g[running[0]], torch.zeros_like(g[running[0]]))


def test_fedavg_changes_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedavg")
    heads0 = snapshot(fed.server.global_state, fed.runtime.head_keys)
    fed.run_round(backend_of(fed))
    assert any(not torch.equal(fed.server.global_state[k], heads0[k]) for k in fed.runtime.head_keys)


def test_fedper_keeps_per_client_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedper", "--algorithm.fedper.personal_heads", "true")
    head_keys = fed.runtime.head_keys
    heads0 = snapshot(fed.server.global_state, head_keys)
    clients = fed.sample_clients(0)
    fed.run_round(backend_of(fed))
    store = fed.server.store
    assert set(store) == set(clients.tolist())
    a, b = (store[int(c)] for c in clients[:2])
    assert set(a) == set(head_keys)  # a client keeps exactly its head
    assert any(not torch.equal(a[k], b[k]) for k in head_keys)  # each client its own head
    assert all(torch.equal(fed.server.global_state[k], heads0[k]) for k in head_keys)  # heads are not averaged
    assert all(not torch.equal(a[k], heads0[k]) for k in head_keys if k.startswith("classifier"))


@pytest.mark.parametrize("algorithm", ["mhmd", "fedavg"])
def test_round_aggregate_is_weighted_mean_of_client_updates(tmp_path, algorithm):
    fed = make_fed(tmp_path, "--algorithm.name", algorithm, "--data.partition", "dirichlet", "--data.alpha", "1.0")
    g = fed.server.global_state
    start = {k: v.clone() for k, v in g.items()}
    clients = fed.sample_clients(0)
    lr = fed.lr(0)
    states, weights = [], []
    for c in clients:  # the same updates, by hand, each from the same global model
        job = ClientJob(int(c), 0, lr)
        upd, _ = fed.algorithm.client_update(fed.runtime, job, g, fed.runtime.batches(int(c), 0, 1))
        states.append({k: v.clone() for k, v in fed.algorithm.shared_state(upd).items()})
        weights.append(len(fed.partition.train[int(c)]))
        for k, v in start.items():  # the global model is unchanged by local updates
            assert torch.equal(g[k], v)
    assert len(set(weights)) > 1  # Dirichlet: unequal sizes, so the weighting matters
    expected = {}
    for k in states[0]:
        stacked = torch.stack([s[k].double() for s in states])
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (stacked.dim() - 1))
        expected[k] = (stacked * w).sum(0) / sum(weights)
    fed.run_round(backend_of(fed))
    for k, v in expected.items():
        got = g[k].double()
        if g[k].is_floating_point():
            assert torch.allclose(got, v, atol=1e-5), k
        else:
            assert torch.equal(got, v.round()), k


# -- whole runs -----------------------------------------------------------------------------------------------------
def test_smoke_run_learns_and_writes_run_dir(tmp_path):
    cfg = tiny_config(tmp_path / "run", "--tracking.plots", "true")
    res = run(cfg)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "partition.npz", "rounds.csv", "evaluations.csv", "personalization.csv",
                 "results.json", "checkpoint.pt", "accuracy_vs_round.png", "finetune_curve.png"):
        assert (run_dir / name).exists(), name
    chance = 100 / 10
    # the global final head stays at its random init (FedBABU/MHMD): it learns slowly; personalisation adapts it
    assert res["best_acc_final"] > 1.2 * chance
    pers = res["personalized"]
    assert len(pers["acc_mean"]) == cfg.personalization.epochs + 1
    assert pers["acc_mean"][0] == pytest.approx(res["global_best"]["acc_final"])  # epoch 0 = the selected model
    assert pers["acc_mean"][-1] > 5 * chance
    assert pers["acc_mean"][-1] > pers["acc_mean"][0] + 20
    assert len(pers["per_client"]) == cfg.data.num_clients
    assert res["rounds"] == cfg.federation.rounds
    import csv
    with open(run_dir / "evaluations.csv") as fh:
        assert [int(r["round"]) for r in csv.DictReader(fh)] == [2, 4, 6]  # eval_every 2 over 6 rounds


def test_same_seed_same_numbers(tmp_path):
    r1 = run(tiny_config(tmp_path / "a", "--federation.rounds", "3", "--personalization.epochs", "1"))
    r2 = run(tiny_config(tmp_path / "b", "--federation.rounds", "3", "--personalization.epochs", "1"))
    r3 = run(tiny_config(tmp_path / "c", "--federation.rounds", "3", "--personalization.epochs", "1", "--seed", "2"))
    assert r1["global_final"] == r2["global_final"]
    assert r1["personalized"]["per_client"] == r2["personalized"]["per_client"]
    assert r1["global_final"] != r3["global_final"]


@pytest.mark.skipif(not (SHARED_DATA / "cifar10_mini.npz").exists(), reason="needs ../shared/data/cifar10_mini.npz")
def test_real_data_mhmd_above_chance(tmp_path):
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "6", "--federation.eval_every", "3",
                      "--personalization.epochs", "2", base="configs/cifar10_mini.yaml")
    cfg.data.path = str(SHARED_DATA / "cifar10_mini.npz")
    res = run(cfg)
    assert res["best_acc_final"] > 20.0  # chance is 10 %
    assert res["personalized"]["acc_mean"][-1] > 30.0  # 2 classes per client: personalisation helps a lot

"""The round loop, the algorithms' defining rules, aggregation, sampling, schedule and end-to-end runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_fixtures import SHARED_DATA, tiny_config
from orchestrator.aggregation import WeightedMean, weighted_average
from orchestrator.backends import InProcessBackend
from orchestrator.federation import Federation, lr_at, sample_clients
from orchestrator.runner import run


def make_fed(tmp_path, *overrides):
    cfg = tiny_config(tmp_path / "run", *overrides)
    return Federation(cfg, tmp_path / "run")


def snapshot(state, keys):
    return {k: state[k].clone() for k in keys}


# -- pure pieces --------------------------------------------------------------------------------------------------
def test_weighted_mean_equals_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20)}
    out = weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == round((10 + 60) / 4)
    with pytest.raises(ValueError):
        WeightedMean().result()
    with pytest.raises(ValueError):
        WeightedMean().add(a, 0.0)


def test_sample_clients_deterministic_distinct():
    s1 = sample_clients(1, 5, 100, 10)
    assert np.array_equal(s1, sample_clients(1, 5, 100, 10))
    assert len(set(s1.tolist())) == 10 and s1.min() >= 0 and s1.max() < 100
    assert not np.array_equal(s1, sample_clients(1, 6, 100, 10))
    assert not np.array_equal(s1, sample_clients(2, 5, 100, 10))
    assert np.array_equal(sample_clients(3, 0, 100, 100), np.arange(100))


def test_lr_schedule_matches_reference():
    # R=320: rounds 1-160 use 0.1, 161-240 use 0.01, 241-320 use 0.001 (SPEC section 4)
    lrs = [lr_at(t, 0.1, 320, [0.5, 0.75], 0.1) for t in range(320)]
    assert lrs[0] == lrs[159] == 0.1
    assert lrs[160] == pytest.approx(0.01) and lrs[239] == pytest.approx(0.01)
    assert lrs[240] == pytest.approx(0.001) and lrs[319] == pytest.approx(0.001)
    assert lr_at(39, 0.1, 80, [0.5, 0.75], 0.1) == 0.1 and lr_at(40, 0.1, 80, [0.5, 0.75], 0.1) == pytest.approx(0.01)


def test_clients_per_round(tmp_path):
    cfg = tiny_config(tmp_path, "--federation.client_fraction", "0.05")
    assert cfg.clients_per_round == 1  # max(1, int(0.05 * 10))
    assert tiny_config(tmp_path, "--federation.client_fraction", "1.0").clients_per_round == 10


# -- the algorithms' defining rules -------------------------------------------------------------------------------
def test_fedbabu_never_changes_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedbabu")
    heads0, body0 = snapshot(fed.global_state, fed.head_keys), snapshot(fed.global_state, fed.body_keys)
    backend = InProcessBackend()
    for _ in range(2):
        fed.run_round(backend)
    for k in fed.head_keys:
        assert torch.equal(fed.global_state[k], heads0[k]), k
    changed = [k for k in fed.body_keys if not torch.equal(fed.global_state[k], body0[k])]
    assert len(changed) > len(fed.body_keys) // 2
    assert not any("running" in k for k in fed.body_keys)  # FedBABU's BN: no running statistics


def test_mhmd_freezes_heads_and_tracks_bn(tmp_path):
    fed = make_fed(tmp_path)  # smoke = mhmd
    heads0 = snapshot(fed.global_state, fed.head_keys)
    fed.run_round(InProcessBackend())
    assert all(torch.equal(fed.global_state[k], heads0[k]) for k in fed.head_keys)
    running = [k for k in fed.body_keys if k.endswith("running_mean")]
    assert running and not torch.equal(fed.global_state[running[0]], torch.zeros_like(fed.global_state[running[0]]))


def test_fedavg_changes_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedavg")
    heads0 = snapshot(fed.global_state, fed.head_keys)
    fed.run_round(InProcessBackend())
    assert any(not torch.equal(fed.global_state[k], heads0[k]) for k in fed.head_keys)


def test_fedper_keeps_per_client_heads(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "fedper")
    heads0 = snapshot(fed.global_state, fed.head_keys)
    clients = fed.sample_clients(0)
    fed.run_round(InProcessBackend())
    assert set(fed.client_state) == set(clients.tolist())
    a, b = (fed.client_state[int(c)]["head"] for c in clients[:2])
    assert any(not torch.equal(a[k], b[k]) for k in fed.head_keys)  # each client its own head
    assert all(torch.equal(fed.global_state[k], heads0[k]) for k in fed.head_keys)  # heads are not averaged
    assert all(not torch.equal(a[k], heads0[k]) for k in fed.head_keys if k.startswith("classifier"))


@pytest.mark.parametrize("algorithm", ["mhmd", "fedavg"])
def test_round_aggregate_is_weighted_mean_of_client_updates(tmp_path, algorithm):
    fed = make_fed(tmp_path, "--algorithm.name", algorithm, "--data.partition", "dirichlet", "--data.alpha", "1.0")
    start = {k: v.clone() for k, v in fed.global_state.items()}
    clients = fed.sample_clients(0)
    lr = fed.lr(0)
    states, weights = [], []
    for c in clients:  # the same updates, by hand, each from the same global model
        upd = fed.algorithm.local_update(fed, int(c), fed.client_batches(int(c), 0, 1), lr)
        states.append({k: v.clone() for k, v in fed.algorithm.shared_state(fed, upd).items()})
        weights.append(len(fed.partition.train[int(c)]))
        for k, v in start.items():  # the global model is unchanged by local updates
            assert torch.equal(fed.global_state[k], v)
    assert len(set(weights)) > 1  # Dirichlet: unequal sizes, so the weighting matters
    expected = {}
    for k in states[0]:
        stacked = torch.stack([s[k].double() for s in states])
        w = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * (stacked.dim() - 1))
        expected[k] = (stacked * w).sum(0) / sum(weights)
    fed.run_round(InProcessBackend())
    for k, v in expected.items():
        got = fed.global_state[k].double()
        if fed.global_state[k].is_floating_point():
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

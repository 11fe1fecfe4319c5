"""MHMD with learned auxiliary heads (orchestrator/algorithms/mhmd_plus.py): what trains, what the server averages,
what stays frozen -- over real rounds -- and the freezing hook (fl_sd.hooks.StepOnly) it relies on."""
from __future__ import annotations

import pytest
import torch

from fed_fixtures import make_fed, snapshot
from fl_sd.hooks import StepOnly
from fl_sd.models import create_model, head_piece_rows
from lightning_modules import MultiHeadClassifier
from orchestrator.algorithms.context import ClientJob
from orchestrator.backends import InProcessBackend


def keys_of(fed, prefix):
    return [k for k in fed.runtime.head_keys if k.startswith(prefix)]


def one_round(fed):
    g = fed.server.global_state
    before = snapshot(g)
    fed.run_round(InProcessBackend(fed.runtime, fed.algorithm))
    return before, g


def test_head_pieces_are_declared_by_the_model():
    net = create_model("cnn4", num_classes=10, width=8)
    keys = net.head_state_keys()
    assert set(net.head_piece_rows("final_head")) == {"classifier.weight", "classifier.bias"}
    assert set(net.head_piece_rows("aux_heads")) == {k for k in keys if k.startswith("aux_heads.")}
    temp = head_piece_rows("temperature", keys)
    assert set(temp) == {f"aux_heads.{i}.fc.weight" for i in range(3)}
    w = net.state_dict()["aux_heads.1.fc.weight"]
    assert w.shape[0] == 11 and w[temp["aux_heads.1.fc.weight"]].shape == (1, w.shape[1])  # the (K+1)-th row
    with torch.no_grad():  # that row is what the temperature is computed from
        x = torch.randn(2, 8, 4, 4)
        _, t = net.aux_heads[1](x)
        assert torch.allclose(t, torch.sigmoid(x.mean(dim=(2, 3)) @ w[-1]))
    with pytest.raises(ValueError, match="unknown head piece 'legs'"):
        head_piece_rows("legs", keys)


def test_mhmd_aux_trains_and_averages_aux_heads_final_head_frozen(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "mhmd_aux")
    before, g = one_round(fed)
    for k in keys_of(fed, "classifier."):
        assert torch.equal(g[k], before[k]), k  # the final head stays at its initialisation (FedBABU)
    for k in keys_of(fed, "aux_heads."):
        assert not torch.equal(g[k], before[k]), k  # auxiliary heads learned and were averaged into the global
        assert not torch.equal(g[k][-1], before[k][-1]), k  # their temperature rows too
    assert any(not torch.equal(g[k], before[k]) for k in fed.runtime.body_keys)
    assert set(fed.shared_keys) == {*fed.runtime.body_keys, *keys_of(fed, "aux_heads.")}
    assert fed.server.store == {}  # nothing is kept per client


def test_mhmd_temp_trains_only_temperature_rows(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "mhmd_temp", "--federation.weight_decay", "0.01")
    before, g = one_round(fed)
    for k in keys_of(fed, "classifier."):
        assert torch.equal(g[k], before[k]), k
    for k in keys_of(fed, "aux_heads."):
        assert torch.equal(g[k][:-1], before[k][:-1]), k  # class rows frozen bit for bit, despite weight decay
        assert not torch.equal(g[k][-1], before[k][-1]), k  # the temperature row learned


def test_aggregate_of_piece_is_weighted_mean(tmp_path):
    fed = make_fed(tmp_path, "--algorithm.name", "mhmd_aux", "--data.partition", "dirichlet", "--data.alpha", "1.0")
    g = fed.server.global_state
    states, weights = [], []
    for c in fed.sample_clients(0):
        upd, own = fed.algorithm.client_update(fed.runtime, ClientJob(int(c), 0, fed.lr(0)), g,
                                               fed.runtime.batches(int(c), 0, 1))
        assert own is None
        states.append(snapshot(fed.algorithm.shared_state(upd)))
        weights.append(len(fed.partition.train[int(c)]))
    assert len(set(weights)) > 1
    fed.run_round(InProcessBackend(fed.runtime, fed.algorithm))
    w = torch.tensor(weights, dtype=torch.float64)
    for k in keys_of(fed, "aux_heads."):
        stacked = torch.stack([s[k].double() for s in states])
        expected = (stacked * w.view(-1, 1, 1)).sum(0) / w.sum()
        assert torch.allclose(g[k].double(), expected, atol=1e-6), k


def test_with_head_lr_zero_the_body_trains_exactly_as_mhmd(tmp_path):
    """The pieces' extra training is the only difference: with their learning rate 0, mhmd_aux is mhmd."""
    states = {}
    for name in ("mhmd", "mhmd_aux"):
        fed = make_fed(tmp_path, "--algorithm.name", name, "--federation.head_lr", "0", name=name)
        one_round(fed)
        states[name] = fed.server.global_state
    for k, v in states["mhmd"].items():
        if k.startswith("aux_heads."):  # unchanged by lr 0; the mean of identical copies may round in the last bit
            assert torch.allclose(states["mhmd_aux"][k], v, rtol=0, atol=1e-6), k
        else:
            assert torch.equal(states["mhmd_aux"][k], v), k


def test_step_only_freezes_rows_and_parameters_exactly():
    torch.manual_seed(0)
    module = MultiHeadClassifier("cnn4", num_classes=4, model_options={"width": 8, "input_size": 16},
                                 weight_decay=0.1)
    start = module.get_state("full")
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))) for _ in range(3)]
    rows = {"aux_heads.0.fc.weight": slice(-1, None), "conv1.0.weight": None}
    module.local_update(batches, train_part="full", lr=0.1, hooks=StepOnly(rows))
    end = module.get_state("full")
    for k in end:
        if k == "aux_heads.0.fc.weight":
            assert torch.equal(end[k][:-1], start[k][:-1]) and not torch.equal(end[k][-1], start[k][-1])
        elif k == "conv1.0.weight" or "running" in k or "num_batches" in k:
            assert not torch.equal(end[k], start[k]), k
        else:
            assert torch.equal(end[k], start[k]), k

"""The server side (orchestrator/server.py): sampling, schedule, the per-client store, model selection, state."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_fixtures import tiny_config
from orchestrator.errors import ConfigError
from orchestrator.server import Server, load_selected_state, lr_at, sample_clients


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


def _server(select="best"):
    return Server({"w": torch.zeros(3), "n": torch.tensor(0)}, select=select, log=lambda m: None)


def test_best_model_selection_snapshots_global_state_and_store():
    server = _server()
    server.round = 2
    server.keep(4, {"w": torch.ones(3)})
    server.keep(5, None)  # nothing to keep: nothing stored
    assert set(server.store) == {4}
    first = server.record_evaluation({"acc_final": 30.0})
    server.global_state["w"].fill_(7.0)
    server.store[4]["w"].fill_(9.0)
    server.round = 4
    worse = server.record_evaluation({"acc_final": 20.0})
    assert (first["best_round"], worse["best_round"], worse["best_acc_final"]) == (2, 2, 30.0)
    state, store, rnd, which = server.selected_model()
    assert which == "best" and rnd == 2
    assert torch.equal(state["w"], torch.zeros(3)) and torch.equal(store[4]["w"], torch.ones(3))  # snapshots
    final = _server("final")
    final.round = 3
    assert final.selected_model()[2:] == (3, "final")


def test_state_dict_round_trip_and_v1_store_migration():
    server = _server()
    server.round = 3
    server.keep(1, {"w": torch.full((3,), 2.0)})
    server.record_evaluation({"acc_final": 10.0})
    saved = server.state_dict()
    other = _server()
    other.load_state_dict(saved, torch.device("cpu"))
    assert other.round == 3 and torch.equal(other.store[1]["w"], saved["client_state"][1]["w"])
    assert other.history == server.history and other.best["round"] == 3
    # format 1 nested a client's state by part name: it is flattened
    v1 = {**saved, "format": 1, "client_state": {1: {"head": {"w": torch.ones(3)}}},
          "best": {**saved["best"], "client_state": {1: {"head": {"w": torch.ones(3)}}}}}
    other.load_state_dict(v1, torch.device("cpu"))
    assert set(other.store[1]) == {"w"} and set(other.best["client_state"][1]) == {"w"}
    with pytest.raises(ValueError, match="different state keys"):
        other.load_state_dict({**saved, "global_state": {"v": torch.zeros(3)}}, torch.device("cpu"))


def test_load_selected_state_errors_name_the_key(tmp_path):
    like = {"w": torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"^k: no checkpoint.pt in"):
        load_selected_state(tmp_path, "best", like, "k", "model")

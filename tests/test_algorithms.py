"""The algorithm contract (orchestrator/algorithms/base.py): a new method is one small class -- shown with an algorithm
defined here, in the test, that keeps a per-client part, has typed options and its own evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fed_fixtures import TINY, differs, snapshot, tiny_config
from orchestrator import evaluation
from orchestrator.algorithms import (Algorithm, AlgorithmOptions, ClientJob, get_algorithm, register_algorithm,
                                     unregister_algorithm)
from orchestrator.algorithms.base import select_part
from orchestrator.errors import ConfigError, OptionError
from orchestrator.federation import Federation
from orchestrator.runner import run


# -- an algorithm in one "file" ------------------------------------------------------------------------------------
@dataclass
class LocalHeadsOptions(AlgorithmOptions):
    #: batches a client's head adapts on before it is tested
    probe_steps: int = 1

    def validate(self) -> None:
        if self.probe_steps < 1:
            raise OptionError("probe_steps", f"must be >= 1, got {self.probe_steps}")


class LocalHeads(Algorithm):
    """Trains everything, averages the body, every client keeps its head; evaluation first adapts each client's head
    on a few of its own training batches (a 'probe'), without changing anything the server keeps."""

    name = "test_local_heads"
    Options = LocalHeadsOptions
    train_part = "full"
    aggregate = "body"
    keeps_part = "head"
    PROBE_STREAM = 4_242

    def evaluate(self, ctx, base_state, store, round_idx, lr):
        def probed(c):
            start = self.client_model(ctx, ClientJob(c, round_idx, lr, store.get(c)), base_state)
            batches = list(ctx.batches(c, round_idx, 1, stream=self.PROBE_STREAM))[: self.options.probe_steps]
            return select_part(ctx.train(batches, start=start, part="head", lr=lr, return_head=True), "full")

        return evaluation.client_models(ctx, probed)


@pytest.fixture
def local_heads():
    register_algorithm(LocalHeads)
    yield LocalHeads
    unregister_algorithm(LocalHeads.name)


def test_one_file_algorithm_with_own_part_options_and_evaluation(tmp_path, local_heads):
    args = (*TINY, "--algorithm.name", "test_local_heads", "--algorithm.test_local_heads.probe_steps", "2",
            "--federation.rounds", "2")
    cfg = tiny_config(tmp_path / "a", *args)
    assert cfg.algorithm_options() == LocalHeadsOptions(probe_steps=2)
    with pytest.raises(ConfigError, match=r"^config key algorithm\.test_local_heads\.probe_steps: must be >= 1"):
        tiny_config(tmp_path / "x", *args, "--algorithm.test_local_heads.probe_steps", "0")

    fed = Federation(cfg, tmp_path / "a")
    rt = fed.runtime
    from orchestrator.backends import InProcessBackend

    fed.run_round(InProcessBackend(rt, fed.algorithm))
    store = fed.server.store
    assert store and all(set(own) == set(rt.head_keys) for own in store.values())  # it keeps exactly its head
    kept, glob = {c: snapshot(s) for c, s in store.items()}, snapshot(fed.server.global_state)
    record = fed.evaluate()
    # its own evaluation ran (probing changes the scores) and left the server's state untouched
    plain = Algorithm.evaluate(fed.algorithm, rt, fed.server.global_state, store, 1, fed.lr(1))
    probed = fed.algorithm.evaluate(rt, fed.server.global_state, store, 1, fed.lr(1))
    assert not (plain[0] == probed[0]).all() or not (plain[1] == probed[1]).all()
    assert record["acc_final"] == pytest.approx(100 * probed[0][0].mean())
    assert not differs(fed.server.global_state, glob, glob)
    assert all(not differs(store[c], kept[c], kept[c]) for c in kept)

    res = run(tiny_config(tmp_path / "b", *args))  # and end to end, with checkpoint and personalisation
    assert res["rounds"] == 2 and len(res["personalized"]["per_client"]) == 4


def test_parts_are_checked():
    with pytest.raises(ValueError, match=r"aggregate must be one of \('body', 'head', 'full'\)"):
        register_algorithm(type("Bad", (Algorithm,), {"name": "test_bad", "aggregate": "legs"}))
    with pytest.raises(ValueError, match="keeps must be one of"):
        type("Bad2", (Algorithm,), {"name": "test_bad2", "keeps_part": "arms"})()
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm("test_bad")
    with pytest.raises(TypeError, match="options must be"):
        get_algorithm("ditto")(LocalHeadsOptions())


def test_client_update_never_writes_server_state(tmp_path):
    """For every algorithm: a client update changes neither the global state it is given nor the own state."""
    from orchestrator.algorithms import list_algorithms

    for name in list_algorithms():
        fed = Federation(tiny_config(tmp_path / name, *TINY, "--algorithm.name", name), tmp_path / name)
        g = fed.server.global_state
        glob = snapshot(g)
        own = None if fed.algorithm.keeps is None else snapshot(
            {k: v + 0.01 for k, v in g.items() if k in fed.runtime.part_keys(fed.algorithm.keeps)})
        before = None if own is None else snapshot(own)
        update, new_own = fed.algorithm.client_update(fed.runtime, ClientJob(1, 0, fed.lr(0), own), g,
                                                      fed.runtime.batches(1, 0, 1))
        assert not differs(g, glob, glob), name
        assert own is None or not differs(own, before, before), name
        assert (new_own is None) == (fed.algorithm.keeps is None), name
        assert fed.server.store == {}, name
        assert torch.isfinite(torch.tensor(update.metrics["loss"])), name

"""The baselines' reference protocols (FedBABU's scripts, ../shared/method/BASELINES.md), one test each, by hand."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from fed_fixtures import TINY, differs, snapshot, tiny_config
from orchestrator import evaluation
from orchestrator.algorithms import perfedavg as perfedavg_mod
from orchestrator.algorithms.base import overlay
from orchestrator.algorithms.context import ClientJob
from orchestrator.backends import InProcessBackend
from orchestrator.federation import Federation


def make_fed(tmp_path, algorithm, *overrides):
    cfg = tiny_config(tmp_path / "run", *TINY, "--algorithm.name", algorithm, *overrides)
    return Federation(cfg, tmp_path / "run")


def run_rounds(fed, n):
    backend = InProcessBackend(fed.runtime, fed.algorithm)
    for _ in range(n):
        fed.run_round(backend)


def hand_momentum_sgd(net, batches, lrs, momentum, after=None):
    """SGD with one momentum buffer per parameter over all of ``net``'s parameters; ``lrs(i, name)`` the learning
    rate of step i; ``after(i, name, p, before)`` may change p after the step."""
    named = list(net.named_parameters())
    bufs = {}
    net.train()
    for i, (x, y) in enumerate(batches):
        grads = torch.autograd.grad(F.cross_entropy(net(x).final, y), [p for _, p in named], allow_unused=True)
        with torch.no_grad():
            for (name, p), g in zip(named, grads):
                before = p.detach().clone()
                g = torch.zeros_like(p) if g is None else g
                bufs[name] = g.clone() if name not in bufs else bufs[name].mul(momentum).add(g)
                p.sub_(lrs(i, name) * bufs[name])
                if after is not None:
                    after(i, name, p, before)


def assert_state_close(got, net, atol=1e-6):
    for k, v in net.state_dict().items():
        assert torch.allclose(got[k], v, atol=atol), k


def test_fedper_discards_the_trained_head_every_round(tmp_path):
    fed = make_fed(tmp_path, "fedper")
    initial = snapshot(fed.server.global_state)
    heads = fed.runtime.head_keys
    run_rounds(fed, 2)
    assert not fed.server.store  # nothing kept per client
    assert not differs(fed.server.global_state, initial, heads)  # evaluated head = the initial head
    assert differs(fed.server.global_state, initial, fed.runtime.body_keys)
    job = ClientJob(0, 2, 0.1, None)
    assert fed.algorithm.client_model(fed.runtime, job, fed.server.global_state) is fed.server.global_state


def test_fedrep_one_optimizer_momentum_carries_into_the_body_phase(tmp_path):
    fed = make_fed(tmp_path, "fedrep", "--federation.momentum", "0.5")
    rt, c, lr = fed.runtime, 1, fed.lr(0)
    head_batches = list(rt.batches(c, 0, 1))
    body_batches = list(rt.batches(c, 0, 1, stream=2_000_003))
    hand = copy.deepcopy(rt.net)
    hand.load_state_dict(fed.server.global_state)
    heads = set(rt.head_keys)
    n_head = len(head_batches)
    hand_momentum_sgd(hand, head_batches + body_batches,
                      lambda i, name: lr if (name in heads) == (i < n_head) else 0.0, 0.5)
    job = ClientJob(c, 0, lr, None)
    update, own = fed.algorithm.client_update(rt, job, fed.server.global_state, iter(head_batches))
    assert_state_close({**update.body_state, **update.head_state}, hand)
    assert set(own) == heads


def test_fedrep_evaluation_retrains_every_client_and_rolls_back(tmp_path):
    fed = make_fed(tmp_path, "fedrep")
    run_rounds(fed, 1)
    glob, store = snapshot(fed.server.global_state), {c: snapshot(s) for c, s in fed.server.store.items()}
    rt = fed.runtime
    acc, _ = fed.algorithm.evaluate(rt, fed.server.global_state, fed.server.store, 1, fed.lr(1))
    assert not differs(fed.server.global_state, glob, glob)  # rolled back: nothing stored changed
    assert fed.server.store.keys() == store.keys() and all(not differs(fed.server.store[c], store[c], store[c])
                                                          for c in store)
    again, _ = fed.algorithm.evaluate(rt, fed.server.global_state, fed.server.store, 1, fed.lr(1))
    assert np.array_equal(acc, again)
    kept = evaluation.client_models(rt, lambda c: overlay(fed.server.global_state, fed.server.store.get(c)))[0]
    assert not np.array_equal(acc, kept)  # the re-trained models, not the kept heads, were tested


def test_perfedavg_reference_meta_steps_share_one_momentum(tmp_path):
    fed = make_fed(tmp_path, "perfedavg")
    rt, c, lr, beta = fed.runtime, 2, fed.lr(0), 0.1
    per_epoch = -(-rt.num_train_samples(c) // rt.batch_size)
    pairs = 1 * (per_epoch // 1 + 1)
    batches = list(rt.batches(c, 0, 3))[:2 * pairs]
    hand = copy.deepcopy(rt.net)
    hand.load_state_dict(fed.server.global_state)
    saved = {}

    def after(i, name, p, before):
        if i % 2 == 0:
            saved[name] = before  # w before the inner step
        else:  # the outer step applies its (momentum) update to w, not to w'
            p.copy_(saved[name] - (before - p))

    hand_momentum_sgd(hand, batches, lambda i, name: lr if i % 2 == 0 else beta, 0.9, after)
    update, _ = fed.algorithm.client_update(rt, ClientJob(c, 0, lr, None), fed.server.global_state, iter([]))
    assert update.num_steps == pairs
    assert_state_close({**update.body_state, **update.head_state}, hand, atol=1e-5)


def test_perfedavg_reference_adapts_on_the_last_sampled_clients_test_split(tmp_path, monkeypatch):
    fed = make_fed(tmp_path, "perfedavg")
    run_rounds(fed, 1)
    last = int(fed.sample_clients(0)[-1])
    rt, seen, real = fed.runtime, [], fed.runtime.batches

    def spy(client, round_idx, epochs, stream=0, **kw):
        seen.append((client, stream, kw.get("split", "train")))
        return real(client, round_idx, epochs, stream, **kw)

    monkeypatch.setattr(rt, "batches", spy)
    fed.evaluate()
    assert seen == [(last, perfedavg_mod.ADAPT_STREAM, "test")] * rt.num_clients
    monkeypatch.setattr(rt, "batches", real)
    b1, b2 = fed.algorithm.adaptation_batches(rt, 0, 1)
    hand = copy.deepcopy(rt.net)
    hand.load_state_dict(fed.server.global_state)
    hand_momentum_sgd(hand, [b1, b2], lambda i, name: fed.lr(1) if i == 0 else 0.1, 0.9)
    adapted = fed.algorithm.client_model(rt, ClientJob(0, 1, fed.lr(1), None), fed.server.global_state)
    assert_state_close(adapted, hand, atol=1e-5)


def test_ditto_reference_round(tmp_path):
    fed = make_fed(tmp_path, "ditto", "--federation.momentum", "0")
    rt, c, lr, lam = fed.runtime, 0, fed.lr(0), 0.75
    start = snapshot(fed.server.global_state)
    # the personal model, by hand: from the round's global, pulled towards the local copy after every step
    upd_local = rt.train(rt.batches(c, 0, 1), start=start, part="full", lr=lr, return_head=True)
    w_k = {**upd_local.body_state, **upd_local.head_state}
    hand = copy.deepcopy(rt.net)
    hand.load_state_dict(start)
    hand_momentum_sgd(hand, list(rt.batches(c, 0, 1, stream=4_000_037)), lambda i, name: lr, 0.0,
                      lambda i, name, p, before: p.sub_(lr * lam * (before - w_k[name])))
    personal_update, own = fed.algorithm.client_update(rt, ClientJob(c, 0, lr, {k: v + 1 for k, v in start.items()}),
                                                       start, rt.batches(c, 0, 1))
    assert_state_close(own, hand)  # the kept personal model is ignored: every round starts from the global
    # a round: the global = mean of the personal models; evaluation: selected -> personal, others -> previous global
    run_rounds(fed, 1)
    selected = [int(x) for x in fed.sample_clients(0)]
    mean = {k: sum(fed.server.store[s][k].double() for s in selected) / len(selected) for k in start}
    for k in start:
        assert torch.allclose(fed.server.global_state[k].double(), mean[k], atol=1e-6), k
    acc, _ = fed.algorithm.evaluate(rt, fed.server.global_state, fed.server.store, 1, fed.lr(1))
    want = evaluation.client_models(rt, lambda x: fed.server.store[x] if x in selected else start)[0]
    assert np.array_equal(acc, want)
    assert fed.algorithm.previous_global is not None and not differs(fed.algorithm.previous_global, start, start)


def test_lg_fedavg_per_client_best_round_and_reaveraged_heads(tmp_path):
    fed = make_fed(tmp_path, "lg_fedavg")
    rt, alg = fed.runtime, fed.algorithm
    initial = snapshot(fed.server.global_state)
    history = [evaluation.client_models(rt, lambda c: initial)[0][0]]  # round -1
    for r in range(1, 4):
        run_rounds(fed, 1)
        current = {c: overlay(fed.server.global_state, fed.server.store.get(c)) for c in range(rt.num_clients)}
        history.append(evaluation.client_models(rt, lambda c: current[c])[0][0])
        acc, _ = alg.evaluate(rt, fed.server.global_state, fed.server.store, r, fed.lr(r))
        assert np.array_equal(alg.best_acc, np.max(history, axis=0))
        heads = rt.head_keys
        head = {k: sum(alg.best_models[c][k].double() for c in range(rt.num_clients)) / rt.num_clients for k in heads}
        want = evaluation.client_models(rt, lambda c: {**alg.best_models[c],
                                                       **{k: v.float() for k, v in head.items()}})[0]
        assert np.allclose(acc, want)

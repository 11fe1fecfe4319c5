"""The paper's other baselines -- LG-FedAvg, FedRep, Per-FedAvg, Ditto: each algorithm's defining rule, by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fed_fixtures import tiny_config
from orchestrator.algorithms import fedrep as fedrep_mod
from orchestrator.algorithms import perfedavg as perfedavg_mod
from orchestrator.backends import InProcessBackend
from orchestrator.config import ConfigError
from orchestrator.federation import Federation
from orchestrator.runner import run

#: A smaller federation than smoke.yaml: 4 clients (2 per round) of 20 16x16 images, a width-8 cnn4, batches of 10.
TINY = ("--data.num_clients", "4", "--data.synthetic",
        "{num_classes: 4, train_per_class: 20, test_per_class: 5, image_size: 16}", "--model.options", "{width: 8}",
        "--federation.batch_size", "10", "--federation.client_fraction", "0.5", "--federation.eval_every", "1",
        "--personalization.epochs", "1", "--checkpoint.every", "1")


def make_fed(tmp_path, algorithm, *overrides, name="run"):
    cfg = tiny_config(tmp_path / name, *TINY, "--algorithm.name", algorithm, *overrides)
    return Federation(cfg, tmp_path / name)


def clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def differs(a, b, keys):
    return any(not torch.equal(a[k], b[k]) for k in keys)


def ce_grads(net, params, batch):
    """d CE(final logits) / d params on one batch, train mode (the 'ce' preset's loss)."""
    x, y = batch
    net.train()
    return torch.autograd.grad(F.cross_entropy(net(x).final, y), params, allow_unused=True)


def hand_sgd(net, params, batches, lr, momentum, extra=None):
    """Plain-PyTorch SGD with momentum (buffer = grad on the first step), optionally + extra(i, p) in the gradient."""
    bufs = [None] * len(params)
    for batch in batches:
        grads = ce_grads(net, params, batch)
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                g = torch.zeros_like(p) if g is None else g
                if extra is not None:
                    g = g + extra(i, p)
                bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul(momentum).add(g)
                p.sub_(lr * bufs[i])


def weighted_mean(states, weights, keys):
    total = sum(weights)
    return {k: sum(s[k].double() * w for s, w in zip(states, weights)) / total for k in keys}


# -- LG-FedAvg -----------------------------------------------------------------------------------------------------
def test_lg_fedavg_averages_heads_keeps_bodies_local(tmp_path):
    fed = make_fed(tmp_path, "lg_fedavg")
    assert fed.shared_keys == fed.head_keys
    start = clone(fed.global_state)
    clients = [int(c) for c in fed.sample_clients(0)]
    heads, weights = [], []
    for c in clients:  # the round by hand: each client from the global model, its head state is what is shared
        upd = fed.algorithm.local_update(fed, c, fed.client_batches(c, 0, 1), fed.lr(0))
        heads.append(clone(fed.algorithm.shared_state(fed, upd)))
        weights.append(fed.num_train_samples(c))
    fed.client_state.clear()
    fed.run_round(InProcessBackend())
    expected = weighted_mean(heads, weights, fed.head_keys)
    for k in fed.head_keys:
        assert torch.allclose(fed.global_state[k].double(), expected[k], atol=1e-6), k
    assert differs(fed.global_state, start, [k for k in fed.head_keys if k.startswith("classifier")])
    assert not differs(fed.global_state, start, fed.body_keys)  # the global body never changes
    a, b = (fed.client_state[c]["body"] for c in clients)
    assert set(fed.client_state) == set(clients) and differs(a, b, fed.body_keys)
    fed.run_round(InProcessBackend())
    assert not differs(fed.global_state, start, fed.body_keys)
    # a client is evaluated with its own body + the global head; a never-selected one with the global model
    c = clients[0]
    fed.algorithm.load_client_model(fed, c, fed.global_state, fed.client_state)
    net_state = fed.module.net.state_dict()
    assert not differs(net_state, fed.client_state[c]["body"], fed.body_keys)
    assert not differs(net_state, fed.global_state, fed.head_keys)
    assert fed.algorithm.per_client_models


def test_lg_fedavg_init_from_fedavg_run(tmp_path):
    fedavg_dir = tmp_path / "fedavg"
    run(tiny_config(fedavg_dir, *TINY, "--algorithm.name", "fedavg", "--federation.rounds", "2",
                    "--personalization.enabled", "false"))
    saved = torch.load(fedavg_dir / "checkpoint.pt", weights_only=False)["state"]
    fed = make_fed(tmp_path, "lg_fedavg", "--algorithm.options", f"{{init_from: {fedavg_dir}}}")
    for k, v in saved["best"]["state"].items():  # select: best -> FedAvg's best-on-test model (its best_model.pt)
        assert torch.equal(fed.global_state[k], v), k
    fed = make_fed(tmp_path, "lg_fedavg", "--algorithm.options", f"{{init_from: {fedavg_dir}}}",
                   "--federation.select", "final", name="final")
    assert not differs(fed.global_state, saved["global_state"], fed.global_state)
    with pytest.raises(ConfigError, match="init_from.*no checkpoint.pt"):
        make_fed(tmp_path, "lg_fedavg", "--algorithm.options", f"{{init_from: {tmp_path / 'missing'}}}")
    with pytest.raises(ConfigError, match="init_from.*not this run's cnn4"):
        make_fed(tmp_path, "lg_fedavg", "--algorithm.options", f"{{init_from: {fedavg_dir}}}",
                 "--model.options", "{width: 4}")


# -- FedRep --------------------------------------------------------------------------------------------------------
def test_fedrep_head_phase_then_body_phase_by_hand(tmp_path, monkeypatch):
    fed = make_fed(tmp_path, "fedrep")
    net, c, lr, mom = fed.module.net, 1, fed.lr(0), fed.cfg.federation.momentum
    head_batches = list(fed.client_batches(c, 0, 1))
    body_batches = list(fed.client_batches(c, 0, 1, tag=fedrep_mod.BODY_PHASE_TAG))
    # hand-run: tau epochs of the head with the body frozen, then one epoch of the body with the head frozen
    hand = copy.deepcopy(net)
    hand.load_state_dict(fed.global_state)
    hand_sgd(hand, list(hand.head_parameters()), head_batches, lr, mom)
    after_head = clone(hand.state_dict())
    hand_sgd(hand, list(hand.body_parameters()), body_batches, lr, mom)
    phases = []
    real = fed.module.local_update

    def spy(batches, **kw):
        before = clone(net.state_dict())
        out = real(batches, **kw)
        phases.append((before, clone(net.state_dict())))
        return out

    monkeypatch.setattr(fed.module, "local_update", spy)
    upd = fed.algorithm.local_update(fed, c, iter(head_batches), lr)
    (_, a0), (b1, a1) = phases
    assert not differs(b1, a0, a0)  # the body phase continues from the head phase's model
    # head phase: only the head changed; body phase: only the body changed
    assert not differs(a0, fed.global_state, fed.body_keys) and differs(a0, fed.global_state, fed.head_keys)
    assert not differs(a1, a0, fed.head_keys) and differs(a1, a0, fed.body_keys)
    for k in fed.head_keys:
        assert torch.allclose(a0[k], after_head[k], atol=1e-6), k
    for k, v in hand.state_dict().items():
        assert torch.allclose(a1[k], v, atol=1e-5), k
    assert not differs(upd.body_state, a1, fed.body_keys)
    assert not differs(fed.client_state[c]["head"], a1, fed.head_keys)  # the client keeps its head


def test_fedrep_heads_persist_per_client_body_averaged(tmp_path):
    fed = make_fed(tmp_path, "fedrep")
    head0 = clone(fed.global_head())
    backend = InProcessBackend()
    fed.run_round(backend)
    first = [int(c) for c in fed.sample_clients(0)]
    assert set(fed.client_state) == set(first)
    assert differs(fed.client_state[first[0]]["head"], fed.client_state[first[1]]["head"], fed.head_keys)
    assert not differs(fed.global_state, head0, fed.head_keys)  # heads are never averaged
    kept = clone(fed.client_state[first[0]]["head"])
    assert not differs(fed.algorithm.client_head(fed, first[0]), kept, fed.head_keys)  # next round starts from it
    fed.algorithm.load_client_model(fed, first[0], fed.global_state, fed.client_state)  # evaluated with it
    assert not differs(fed.module.net.state_dict(), kept, fed.head_keys)
    fed.run_round(backend)
    second = [int(c) for c in fed.sample_clients(1)]
    for c in set(first) - set(second):  # not selected again: its head is untouched
        assert not differs(fed.client_state[c]["head"], kept if c == first[0] else fed.client_state[c]["head"],
                           fed.head_keys)
    with pytest.raises(ConfigError, match="head_epochs"):
        tiny_config(tmp_path / "x", "--algorithm.name", "fedrep", "--algorithm.options", "{head_epochs: 0}")


# -- Per-FedAvg ----------------------------------------------------------------------------------------------------
def test_perfedavg_first_order_step_by_hand(tmp_path):
    fed = make_fed(tmp_path, "perfedavg")
    net, c, alpha, beta = fed.module.net, 2, fed.lr(0), 0.1
    b1, b2 = list(fed.client_batches(c, 0, 1))[:2]
    hand = copy.deepcopy(net)
    hand.load_state_dict(fed.global_state)
    params = list(hand.parameters())
    w0 = [p.detach().clone() for p in params]
    g1 = ce_grads(hand, params, b1)
    with torch.no_grad():  # w' = w - alpha grad L1(w)
        for p, g in zip(params, g1):
            if g is not None:
                p.sub_(alpha * g)
    g2 = ce_grads(hand, params, b2)  # grad L2(w')
    expected = [w - beta * (torch.zeros_like(w) if g is None else g) for w, g in zip(w0, g2)]
    upd = fed.algorithm.local_update(fed, c, iter([b1, b2]), alpha)
    got = {**upd.body_state, **upd.head_state}
    for (name, _), e in zip(hand.named_parameters(), expected):
        assert torch.allclose(got[name], e, atol=1e-6), name
    assert upd.num_steps == 1 and set(fed.shared_keys) == set(fed.global_state)  # one pair; the whole model shared


@pytest.mark.parametrize("adapt_on", ["train", "test"])
def test_perfedavg_adapts_on_own_split_only(tmp_path, monkeypatch, adapt_on):
    fed = make_fed(tmp_path, "perfedavg", "--algorithm.options", f"{{adapt_on: {adapt_on}}}")
    seen = []
    real = perfedavg_mod.client_batches

    def spy(data, indices, *args, **kw):
        seen.append((data, indices))
        return real(data, indices, *args, **kw)

    monkeypatch.setattr(perfedavg_mod, "client_batches", spy)
    fed.evaluate()  # every client adapts before it is tested
    c = 3
    fed.algorithm.load_client_model(fed, c, fed.global_state, fed.client_state)
    adapted = clone(fed.module.net.state_dict())
    data, index = (fed.train_data, fed._train_index) if adapt_on == "train" else (fed.test_data, fed._test_index)
    assert len(seen) == 4 + 1 and all(d is data for d, _ in seen)
    assert torch.equal(seen[-1][1], index[c])  # the client's own split
    # the personalised model = the global model after one SGD step on that batch
    hand = copy.deepcopy(fed.module.net)
    hand.load_state_dict(fed.global_state)
    batch = fed.algorithm.adaptation_batch(fed, c)
    hand_sgd(hand, list(hand.parameters()), [batch], fed.lr(fed.round), 0.0)
    for k, v in hand.state_dict().items():
        assert torch.allclose(adapted[k], v, atol=1e-6), k


def test_perfedavg_personalises_the_best_round_model_as_it_was_evaluated(tmp_path):
    fed = make_fed(tmp_path, "perfedavg", "--federation.rounds", "4")
    fed.best = {"round": 1, "acc": 50.0, "state": clone(fed.global_state), "client_state": {}}
    fed.round = 4  # the run went on; lr(1) = 0.05, lr(4) = 0.0005: the adaptation must use the best round's
    assert fed.lr(1) != fed.lr(4)
    c = 0
    fed.algorithm.load_client_model(fed, c, fed.best["state"], {})
    adapted = clone(fed.module.net.state_dict())
    hand = copy.deepcopy(fed.module.net)
    hand.load_state_dict(fed.best["state"])
    hand_sgd(hand, list(hand.parameters()), [fed.algorithm.adaptation_batch(fed, c, 1)], fed.lr(1), 0.0)
    for k, v in hand.state_dict().items():
        assert torch.allclose(adapted[k], v, atol=1e-6), k


# -- Ditto -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reset", [False, True])
def test_ditto_personal_model_is_proximal_sgd_by_hand(tmp_path, reset):
    fed = make_fed(tmp_path, "ditto", "--federation.momentum", "0", "--algorithm.options",
                   f"{{lam: 0.5, reset_personal: {str(reset).lower()}}}")
    net, c, lr, lam = fed.module.net, 0, fed.lr(0), 0.5
    batches = list(fed.client_batches(c, 0, 1))
    assert len(batches) == 2
    glob = clone(fed.global_state)
    stored = {k: v + 0.05 * torch.randn_like(v) for k, v in glob.items()}  # the personal model kept from before
    fed.client_state[c] = {"personal": clone(stored)}
    hand = copy.deepcopy(net)
    hand.load_state_dict(glob if reset else stored)
    names = [n for n, _ in hand.named_parameters()]
    hand_sgd(hand, list(hand.parameters()), batches, lr, 0.0, extra=lambda i, p: lam * (p - glob[names[i]]))
    local = copy.deepcopy(net)  # the global model's local copy: plain SGD, the client's contribution to the average
    local.load_state_dict(glob)
    hand_sgd(local, list(local.parameters()), batches, lr, 0.0)
    upd = fed.algorithm.local_update(fed, c, iter(batches), lr)
    for k, v in hand.state_dict().items():
        assert torch.allclose(fed.client_state[c]["personal"][k], v, atol=1e-6), k
    shared = fed.algorithm.shared_state(fed, upd)
    for k, v in local.state_dict().items():
        assert torch.allclose(shared[k], v, atol=1e-6), k
    assert not differs(fed.global_state, glob, glob)


def test_ditto_global_is_average_of_local_models_personal_persist(tmp_path):
    fed = make_fed(tmp_path, "ditto")
    backend = InProcessBackend()
    fed.run_round(backend)
    personal1 = {c: clone(s["personal"]) for c, s in fed.client_state.items()}
    start = clone(fed.global_state)
    clients = [int(c) for c in fed.sample_clients(1)]
    locals_, weights = [], []
    saved_store = {c: {"personal": clone(s["personal"])} for c, s in fed.client_state.items()}
    for c in clients:
        upd = fed.algorithm.local_update(fed, c, fed.client_batches(c, 1, 1), fed.lr(1))
        locals_.append(clone(fed.algorithm.shared_state(fed, upd)))
        weights.append(fed.num_train_samples(c))
    fed.client_state.clear()
    fed.client_state.update(saved_store)
    fed.run_round(backend)
    expected = weighted_mean(locals_, weights, start)
    for k in start:
        assert torch.allclose(fed.global_state[k].double(), expected[k], atol=1e-6), k
    for c in personal1:  # personal models persist: an unselected client's is untouched, a selected one's moved on
        same = not differs(fed.client_state[c]["personal"], personal1[c], start)
        assert same == (c not in clients)
    c = next(iter(personal1))  # evaluated with its personal model; a never-selected client with the global one
    fed.algorithm.load_client_model(fed, c, fed.global_state, fed.client_state)
    assert not differs(fed.module.net.state_dict(), fed.client_state[c]["personal"], start)
    never = [c for c in range(4) if c not in fed.client_state]
    for c in never:
        fed.algorithm.load_client_model(fed, c, fed.global_state, fed.client_state)
        assert not differs(fed.module.net.state_dict(), fed.global_state, start)


# -- whole runs: checkpointed client state, resume, results --------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["fedrep", "perfedavg", "ditto", "lg_fedavg"])
def test_baseline_runs_end_to_end_and_resumes(tmp_path, algorithm):
    args = (*TINY, "--algorithm.name", algorithm, "--federation.rounds", "2")
    full = run(tiny_config(tmp_path / "full", *args))
    assert run(tiny_config(tmp_path / "cut", *args), stop_after=1) == {}
    resumed = run(None, resume=tmp_path / "cut")
    assert resumed["personalized"]["acc_mean"] == full["personalized"]["acc_mean"]
    assert resumed["best_acc_final"] == full["best_acc_final"]
    # personalisation starts from exactly the per-client models evaluated at the selected (best) round
    assert full["personalized"]["start_round"] == full["best_round"]
    assert full["personalized"]["acc_mean"][0] == pytest.approx(full["best_acc_final"])
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["state"]
    for parts in state["client_state"].values():  # per-client state: tensors only
        assert all(isinstance(t, torch.Tensor) for part in parts.values() for t in part.values())
    if algorithm != "perfedavg":
        assert state["client_state"]

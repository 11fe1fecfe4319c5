"""The paper's other baselines -- LG-FedAvg, FedRep, Per-FedAvg, Ditto: each algorithm's defining rule, by hand."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fed_fixtures import TINY, differs, snapshot, tiny_config
from orchestrator.algorithms import fedrep as fedrep_mod
from orchestrator.algorithms import perfedavg as perfedavg_mod
from orchestrator.algorithms.context import ClientJob
from orchestrator.backends import InProcessBackend
from orchestrator.errors import ConfigError
from orchestrator.federation import Federation
from orchestrator.runner import run


def make_fed(tmp_path, algorithm, *overrides, name="run"):
    cfg = tiny_config(tmp_path / name, *TINY, "--algorithm.name", algorithm, *overrides)
    return Federation(cfg, tmp_path / name)


def backend_of(fed):
    return InProcessBackend(fed.runtime, fed.algorithm)


def update(fed, client, round_idx, batches=None, own=None):
    """One client update through the algorithm, from the current global model: (ClientUpdate, new own state)."""
    job = ClientJob(client, round_idx, fed.lr(round_idx), own)
    if batches is None:
        batches = fed.runtime.batches(client, round_idx, 1)
    return fed.algorithm.client_update(fed.runtime, job, fed.server.global_state, batches)


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


#: FedRep with fl-sd's own variant: a fresh optimizer per phase, evaluated with the kept heads
FEDREP_OWN = ("--algorithm.fedrep", "{one_optimizer: false, retrain_at_evaluation: false}")


def model_of(fed, client, store=None):
    """The full state the algorithm evaluates ``client`` with, after the rounds done so far."""
    store = fed.server.store if store is None else store
    job = ClientJob(client, fed.round, fed.lr(fed.round), store.get(client))
    return fed.algorithm.client_model(fed.runtime, job, fed.server.global_state)


# -- LG-FedAvg -----------------------------------------------------------------------------------------------------
def test_lg_fedavg_averages_heads_keeps_bodies_local(tmp_path):
    fed = make_fed(tmp_path, "lg_fedavg", "--algorithm.lg_fedavg.per_client_best", "false")
    rt, g = fed.runtime, fed.server.global_state
    assert fed.shared_keys == rt.head_keys
    start = snapshot(g)
    clients = [int(c) for c in fed.sample_clients(0)]
    heads, weights = [], []
    for c in clients:  # the round by hand: each client from the global model, its head state is what is shared
        upd, own = update(fed, c, 0)
        assert set(own) == set(rt.body_keys)  # the client keeps its body
        heads.append(snapshot(fed.algorithm.shared_state(upd)))
        weights.append(rt.num_train_samples(c))
    fed.run_round(backend_of(fed))
    expected = weighted_mean(heads, weights, rt.head_keys)
    for k in rt.head_keys:
        assert torch.allclose(g[k].double(), expected[k], atol=1e-6), k
    assert differs(g, start, [k for k in rt.head_keys if k.startswith("classifier")])
    assert not differs(g, start, rt.body_keys)  # the global body never changes
    store = fed.server.store
    a, b = (store[c] for c in clients)
    assert set(store) == set(clients) and differs(a, b, rt.body_keys)
    fed.run_round(backend_of(fed))
    assert not differs(g, start, rt.body_keys)
    # a client is evaluated with its own body + the global head; a never-selected one with the global model
    c = clients[0]
    state = model_of(fed, c)
    assert not differs(state, store[c], rt.body_keys)
    assert not differs(state, g, rt.head_keys)
    assert fed.algorithm.per_client_models


def test_lg_fedavg_init_from_fedavg_run(tmp_path):
    fedavg_dir = tmp_path / "fedavg"
    run(tiny_config(fedavg_dir, *TINY, "--algorithm.name", "fedavg", "--federation.rounds", "2",
                    "--personalization.enabled", "false"))
    saved = torch.load(fedavg_dir / "checkpoint.pt", weights_only=False)["state"]
    fed = make_fed(tmp_path, "lg_fedavg", "--algorithm.lg_fedavg.init_from", str(fedavg_dir))
    for k, v in saved["best"]["state"].items():  # select: best -> FedAvg's best-on-test model (its best_model.pt)
        assert torch.equal(fed.server.global_state[k], v), k
    fed = make_fed(tmp_path, "lg_fedavg", "--algorithm.lg_fedavg.init_from", str(fedavg_dir),
                   "--federation.select", "final", name="final")
    assert not differs(fed.server.global_state, saved["global_state"], saved["global_state"])
    with pytest.raises(ConfigError, match="init_from.*no checkpoint.pt"):
        make_fed(tmp_path, "lg_fedavg", "--algorithm.lg_fedavg.init_from", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="init_from.*not this run's cnn4"):
        make_fed(tmp_path, "lg_fedavg", "--algorithm.lg_fedavg.init_from", str(fedavg_dir),
                 "--model.options", "{width: 4}")


# -- FedRep --------------------------------------------------------------------------------------------------------
def test_fedrep_head_phase_then_body_phase_by_hand(tmp_path, monkeypatch):
    fed = make_fed(tmp_path, "fedrep", *FEDREP_OWN)
    rt, g = fed.runtime, fed.server.global_state
    net, c, lr, mom = rt.net, 1, fed.lr(0), fed.cfg.federation.momentum
    head_batches = list(rt.batches(c, 0, 1))
    body_batches = list(rt.batches(c, 0, 1, stream=fedrep_mod.BODY_PHASE_STREAM))
    # hand-run: tau epochs of the head with the body frozen, then one epoch of the body with the head frozen
    hand = copy.deepcopy(net)
    hand.load_state_dict(g)
    hand_sgd(hand, list(hand.head_parameters()), head_batches, lr, mom)
    after_head = snapshot(hand.state_dict())
    hand_sgd(hand, list(hand.body_parameters()), body_batches, lr, mom)
    phases = []
    real = rt.module.local_update

    def spy(batches, **kw):
        before = snapshot(net.state_dict())
        out = real(batches, **kw)
        phases.append((before, snapshot(net.state_dict())))
        return out

    monkeypatch.setattr(rt.module, "local_update", spy)
    upd, own = update(fed, c, 0, iter(head_batches))
    (_, a0), (b1, a1) = phases
    assert not differs(b1, a0, a0)  # the body phase continues from the head phase's model
    # head phase: only the head changed; body phase: only the body changed
    assert not differs(a0, g, rt.body_keys) and differs(a0, g, rt.head_keys)
    assert not differs(a1, a0, rt.head_keys) and differs(a1, a0, rt.body_keys)
    for k in rt.head_keys:
        assert torch.allclose(a0[k], after_head[k], atol=1e-6), k
    for k, v in hand.state_dict().items():
        assert torch.allclose(a1[k], v, atol=1e-5), k
    assert not differs(upd.body_state, a1, rt.body_keys)
    assert set(own) == set(rt.head_keys) and not differs(own, a1, rt.head_keys)  # the client keeps its head


def test_fedrep_heads_persist_per_client_body_averaged(tmp_path):
    fed = make_fed(tmp_path, "fedrep", *FEDREP_OWN)
    rt, g, store = fed.runtime, fed.server.global_state, fed.server.store
    head0 = snapshot(g, rt.head_keys)
    backend = backend_of(fed)
    fed.run_round(backend)
    first = [int(c) for c in fed.sample_clients(0)]
    assert set(store) == set(first)
    assert differs(store[first[0]], store[first[1]], rt.head_keys)
    assert not differs(g, head0, rt.head_keys)  # heads are never averaged
    kept = snapshot(store[first[0]])
    assert not differs(model_of(fed, first[0]), kept, rt.head_keys)  # evaluated with it
    fed.run_round(backend)
    second = [int(c) for c in fed.sample_clients(1)]
    for c in set(first) - set(second):  # not selected again: its head is untouched
        if c == first[0]:
            assert not differs(store[c], kept, rt.head_keys)
    with pytest.raises(ConfigError, match=r"algorithm\.fedrep\.head_epochs: must be an integer >= 1"):
        tiny_config(tmp_path / "x", "--algorithm.name", "fedrep", "--algorithm.fedrep.head_epochs", "0")


# -- Per-FedAvg ----------------------------------------------------------------------------------------------------
def test_perfedavg_first_order_step_by_hand(tmp_path):
    fed = make_fed(tmp_path, "perfedavg", "--algorithm.perfedavg.meta_steps", "paired_batches")
    rt = fed.runtime
    net, c, alpha, beta = rt.net, 2, fed.lr(0), 0.1
    b1, b2 = list(rt.batches(c, 0, 1))[:2]
    hand = copy.deepcopy(net)
    hand.load_state_dict(fed.server.global_state)
    params = list(hand.parameters())
    w0 = [p.detach().clone() for p in params]
    g1 = ce_grads(hand, params, b1)
    with torch.no_grad():  # w' = w - alpha grad L1(w)
        for p, g in zip(params, g1):
            if g is not None:
                p.sub_(alpha * g)
    g2 = ce_grads(hand, params, b2)  # grad L2(w')
    expected = [w - beta * (torch.zeros_like(w) if g is None else g) for w, g in zip(w0, g2)]
    upd, own = update(fed, c, 0, iter([b1, b2]))
    got = {**upd.body_state, **upd.head_state}
    for (name, _), e in zip(hand.named_parameters(), expected):
        assert torch.allclose(got[name], e, atol=1e-6), name
    assert own is None
    # one pair; its loss is the outer batch's, at w'
    assert upd.num_steps == 1 and set(fed.shared_keys) == set(fed.server.global_state)
    with torch.no_grad():
        hand.load_state_dict(fed.server.global_state)
        hand.train()
        for p, g in zip(hand.parameters(), g1):
            if g is not None:
                p.sub_(alpha * g)
        assert upd.metrics["loss"] == pytest.approx(float(F.cross_entropy(hand(b2[0]).final, b2[1])), rel=1e-5)


@pytest.mark.parametrize("adapt_on", ["train", "test"])
def test_perfedavg_adapts_on_own_split_only(tmp_path, monkeypatch, adapt_on):
    fed = make_fed(tmp_path, "perfedavg", "--algorithm.perfedavg.adapt", adapt_on)
    rt = fed.runtime
    seen = []
    real = rt.batches

    def spy(client, round_idx, epochs, stream=0, **kw):
        seen.append((client, stream, kw.get("split", "train")))
        return real(client, round_idx, epochs, stream, **kw)

    monkeypatch.setattr(rt, "batches", spy)
    fed.evaluate()  # every client adapts before it is tested
    assert seen == [(c, perfedavg_mod.ADAPT_STREAM, adapt_on) for c in range(4)]  # each on its own split
    c = 3
    adapted = model_of(fed, c)
    # the personalised model = the global model after one SGD step on that batch
    hand = copy.deepcopy(rt.net)
    hand.load_state_dict(fed.server.global_state)
    batch = fed.algorithm.adaptation_batch(rt, c, fed.round)
    hand_sgd(hand, list(hand.parameters()), [batch], fed.lr(fed.round), 0.0)
    for k, v in hand.state_dict().items():
        assert torch.allclose(adapted[k], v, atol=1e-6), k


def test_perfedavg_personalises_the_best_round_model_as_it_was_evaluated(tmp_path):
    fed = make_fed(tmp_path, "perfedavg", "--federation.rounds", "4", "--algorithm.perfedavg.adapt", "train")
    rt = fed.runtime
    fed.server.best = {"round": 1, "acc": 50.0, "state": snapshot(fed.server.global_state), "client_state": {}}
    fed.server.round = 4  # the run went on; lr(1) = 0.05, lr(4) = 0.0005: the adaptation must use the best round's
    assert fed.lr(1) != fed.lr(4)
    seen = []
    real = rt.train

    def spy(batches, **kw):
        batches = list(batches)
        seen.append((batches, kw["lr"], snapshot(kw["start"]) if kw["start"] is not None else None))
        return real(batches, **kw)

    rt.train = spy
    fed.personalize()
    (adapt_batches, adapt_lr, adapt_start), (_, ft_lr, ft_start) = seen[:2]
    assert adapt_lr == fed.lr(1) and ft_lr == fed.cfg.personalization.lr and ft_start is None
    assert not differs(adapt_start, fed.server.best["state"], adapt_start)
    want = fed.algorithm.adaptation_batch(rt, 0, 1)
    assert torch.equal(adapt_batches[0][0], want[0]) and torch.equal(adapt_batches[0][1], want[1])


# -- Ditto -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reset", [False, True])
def test_ditto_personal_model_is_proximal_sgd_by_hand(tmp_path, reset):
    fed = make_fed(tmp_path, "ditto", "--federation.momentum", "0", "--algorithm.ditto",
                   f"{{lam: 0.5, protocol: persistent, reset_personal: {str(reset).lower()}}}")
    rt = fed.runtime
    net, c, lr, lam = rt.net, 0, fed.lr(0), 0.5
    batches = list(rt.batches(c, 0, 1))
    assert len(batches) == 2
    glob = snapshot(fed.server.global_state)
    stored = {k: v + 0.05 * torch.randn_like(v) for k, v in glob.items()}  # the personal model kept from before
    hand = copy.deepcopy(net)
    hand.load_state_dict(glob if reset else stored)
    names = [n for n, _ in hand.named_parameters()]
    hand_sgd(hand, list(hand.parameters()), batches, lr, 0.0, extra=lambda i, p: lam * (p - glob[names[i]]))
    local = copy.deepcopy(net)  # the global model's local copy: plain SGD, the client's contribution to the average
    local.load_state_dict(glob)
    hand_sgd(local, list(local.parameters()), batches, lr, 0.0)
    upd, personal = update(fed, c, 0, iter(batches), own=snapshot(stored))
    for k, v in hand.state_dict().items():
        assert torch.allclose(personal[k], v, atol=1e-6), k
    shared = fed.algorithm.shared_state(upd)
    for k, v in local.state_dict().items():
        assert torch.allclose(shared[k], v, atol=1e-6), k
    assert not differs(fed.server.global_state, glob, glob)


def test_ditto_global_is_average_of_local_models_personal_persist(tmp_path):
    fed = make_fed(tmp_path, "ditto", "--algorithm.ditto.protocol", "persistent")
    store, g = fed.server.store, fed.server.global_state
    backend = backend_of(fed)
    fed.run_round(backend)
    personal1 = {c: snapshot(s) for c, s in store.items()}
    start = snapshot(g)
    clients = [int(c) for c in fed.sample_clients(1)]
    locals_, weights = [], []
    for c in clients:
        upd, _ = update(fed, c, 1, own=store.get(c))
        locals_.append(snapshot(fed.algorithm.shared_state(upd)))
        weights.append(fed.runtime.num_train_samples(c))
    fed.run_round(backend)
    expected = weighted_mean(locals_, weights, start)
    for k in start:
        assert torch.allclose(g[k].double(), expected[k], atol=1e-6), k
    for c in personal1:  # personal models persist: an unselected client's is untouched, a selected one's moved on
        same = not differs(store[c], personal1[c], start)
        assert same == (c not in clients)
    c = next(iter(personal1))  # evaluated with its personal model; a never-selected client with the global one
    assert not differs(model_of(fed, c), store[c], start)
    for c in [c for c in range(4) if c not in store]:
        assert not differs(model_of(fed, c), g, start)


# -- whole runs: checkpointed client state, resume, results --------------------------------------------------------
#: the improved variants, whose evaluated model is the one personalisation starts from
OWN_VARIANTS = {"fedrep": FEDREP_OWN, "ditto": ("--algorithm.ditto.protocol", "persistent"),
                "lg_fedavg": ("--algorithm.lg_fedavg.per_client_best", "false"),
                "perfedavg": ("--algorithm.perfedavg.adapt", "train")}


@pytest.mark.parametrize("variant", ["reference", "own"])
@pytest.mark.parametrize("algorithm", ["fedrep", "perfedavg", "ditto", "lg_fedavg"])
def test_baseline_runs_end_to_end_and_resumes(tmp_path, algorithm, variant):
    """A run cut after round 1 and resumed ends with the same numbers: the algorithm's server-side memory (Ditto's
    previous global, LG-FedAvg's per-client best models, Per-FedAvg's last sampled clients) is checkpointed."""
    options = OWN_VARIANTS[algorithm] if variant == "own" else ()
    args = (*TINY, "--algorithm.name", algorithm, "--federation.rounds", "3", *options)
    full = run(tiny_config(tmp_path / "full", *args))
    assert run(tiny_config(tmp_path / "cut", *args), stop_after=1) == {}
    resumed = run(None, resume=tmp_path / "cut")
    assert resumed["personalized"]["acc_mean"] == full["personalized"]["acc_mean"]
    assert resumed["best_acc_final"] == full["best_acc_final"]
    assert resumed["global_final"]["acc_final"] == full["global_final"]["acc_final"]
    assert full["personalized"]["start_round"] == full["best_round"]
    if variant == "own" or algorithm == "perfedavg":
        # personalisation starts from exactly the per-client models evaluated at the selected (best) round
        assert full["personalized"]["acc_mean"][0] == pytest.approx(full["best_acc_final"])
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["state"]
    for own in state["client_state"].values():  # per-client state: one flat state dict of tensors
        assert all(isinstance(t, torch.Tensor) for t in own.values())
    if algorithm != "perfedavg":
        assert state["client_state"]

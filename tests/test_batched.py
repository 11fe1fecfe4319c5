"""The batched engine (lightning_modules/batched.py, backend: batched) equals the sequential one.

Unit level: K clients' local updates as one vmapped computation equal K ``local_update`` calls (BatchNorm with and
without running statistics, clients of different sizes, momentum, weight decay, frozen parts). Federation level:
after 3 rounds of every batchable algorithm, global state, every client's kept state, the evaluation and the
personalisation curve equal the in-process backend's within 1e-10 relative in float64 (precision: 64-true) and 1e-4
in float32, for shard and Dirichlet partitions.
"""
from __future__ import annotations

import math

import pytest
import torch

from fed_fixtures import TINY, tiny_config
from fl_sd.stacked import StackedModels, stacked_forward
from lightning_modules.batched import batched_local_update
from lightning_modules.client import MultiHeadClassifier
from orchestrator.backends import make_backend
from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.federation import Federation


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


def max_state_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(rel_err(a[k], b[k]) for k in a)


def client_streams(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(b, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 5, (b,), generator=g))
             for b in client] for client in sizes]


def perturbed_starts(module, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    starts = []
    for i in range(k):
        state = {n: v.detach().clone() for n, v in module.net.state_dict().items()}
        for n, v in state.items():
            if v.is_floating_point():
                v.add_(0.05 * i * torch.randn(v.shape, generator=g, dtype=v.dtype))
        starts.append(state)
    return starts


@pytest.mark.parametrize("running_stats", [False, True])
@pytest.mark.parametrize("part", ["body", "full", "head"])
def test_batched_update_equals_sequential_float64(running_stats, part):
    torch.manual_seed(0)
    module = MultiHeadClassifier(model="cnn4", num_classes=5, model_options={"width": 8, "input_size": 16,
                                                                               "track_running_stats": running_stats},
                                 lr=0.05, momentum=0.9, weight_decay=1e-3).double()
    starts = perturbed_starts(module, 3)
    # unequal clients: remainder batches and a client that finishes two steps early
    streams = client_streams([[8, 8, 5, 8], [8, 8, 5, 8], [8, 3]], torch.float64)
    sequential = [module.local_update(s, state=st, train_part=part, lr=0.05, head_lr=0.02, return_head=True)
                  for s, st in zip(streams, starts)]
    batched = batched_local_update(module, starts, streams, train_part=part, lr=0.05, head_lr=0.02, return_head=True)
    for seq, bat in zip(sequential, batched):
        assert bat.num_steps == seq.num_steps and bat.num_samples == seq.num_samples
        assert max_state_err(seq.body_state, bat.body_state) < 1e-10
        assert max_state_err(seq.head_state, bat.head_state) < 1e-10
        assert seq.metrics.keys() == bat.metrics.keys()
        for key in seq.metrics:
            assert bat.metrics[key] == pytest.approx(seq.metrics[key], rel=1e-10, abs=1e-12), key
    for st, bat in zip(starts, batched):  # frozen parts never change
        frozen = bat.head_state if part == "body" else bat.body_state if part == "head" else {}
        for key, value in frozen.items():
            if value.is_floating_point() and not ("running" in key):
                assert torch.equal(value, st[key]), key
    if running_stats:  # each client updated its own BN statistics
        key = next(k for k in batched[0].body_state if k.endswith("running_mean"))
        assert not torch.equal(batched[0].body_state[key], batched[1].body_state[key])
        assert int(batched[2].body_state[key.replace("running_mean", "num_batches_tracked")]) == 2


def test_batched_update_float32_and_epoch_callback():
    torch.manual_seed(1)
    module = MultiHeadClassifier(model="cnn4", num_classes=5, model_options={"width": 8, "input_size": 16},
                                 lr=0.05, train_part="body")
    starts = perturbed_starts(module, 2)
    sizes = [[8, 8, 8, 8], [8, 4, 8, 4, 8, 4]]  # 2 and 3 steps per epoch
    streams = client_streams(sizes, torch.float32)
    seen_seq: list[list[float]] = [[], []]
    for k in range(2):
        def at_epoch(epoch, k=k):
            seen_seq[k].append(float(module.net.classifier.weight.detach().sum() + next(module.net.parameters()).detach().sum()))
        module.local_update(streams[k], state=starts[k], on_epoch_end=at_epoch, steps_per_epoch=[2, 3][k])
    seen_bat: list[list[float]] = [[], []]

    def at_epochs(done, models: StackedModels):
        for k, epoch in done:
            state = models.state(k)
            first = next(n for n, _ in module.net.named_parameters())
            seen_bat[k].append(float(state["classifier.weight"].sum() + state[first].sum()))
            assert epoch == len(seen_bat[k])

    batched = batched_local_update(module, starts, streams, steps_per_epoch=[2, 3], on_epoch_end=at_epochs)
    assert [len(s) for s in seen_bat] == [2, 2]
    for a, b in zip(seen_seq, seen_bat):
        assert b == pytest.approx(a, rel=1e-4)
    assert all(u.num_steps == len(s) for u, s in zip(batched, sizes))


def test_stacked_forward_equals_each_model():
    module = MultiHeadClassifier(model="cnn4", num_classes=5, model_options={"width": 8, "input_size": 16}).double()
    starts = perturbed_starts(module, 3)
    models = StackedModels.stack(starts, list(starts[0]))
    x = torch.randn(3, 6, 3, 16, 16, dtype=torch.float64)
    module.net.eval()
    out = stacked_forward(module.net, models, x)
    for k in range(3):
        module.load_state(starts[k])
        ref = module.net(x[k])
        assert rel_err(ref.final, out.final[k]) < 1e-12
        assert rel_err(ref.temperature[0], out.temperature[0][k]) < 1e-12


# -- whole federations ------------------------------------------------------------------------------------------------
def run(tmp_path, backend, *overrides, rounds=3):
    cfg = tiny_config(tmp_path / backend, *TINY, "--backend", backend, *overrides)
    fed = Federation(cfg, tmp_path / backend, log=lambda *_: None)
    engine = make_backend(backend, cfg, fed.run_dir, fed.runtime, fed.algorithm)
    try:
        logs = [fed.run_round(engine) for _ in range(rounds)]
    finally:
        engine.close()
    evaluation = fed.evaluate()
    personalized = fed.personalize()
    return fed, logs, evaluation, personalized


def assert_same_federation(a, b, tol):
    fed_a, logs_a, eval_a, pers_a = a
    fed_b, logs_b, eval_b, pers_b = b
    assert max_state_err(fed_a.server.global_state, fed_b.server.global_state) < tol
    assert fed_a.server.store.keys() == fed_b.server.store.keys()
    for c in fed_a.server.store:
        assert max_state_err(fed_a.server.store[c], fed_b.server.store[c]) < tol
    for la, lb in zip(logs_a, logs_b):
        for key, value in la.items():
            if key.startswith("train_"):
                assert lb[key] == pytest.approx(value, rel=tol, abs=tol), key
    for key, value in eval_a.items():
        if isinstance(value, float) and math.isfinite(value):
            assert eval_b[key] == pytest.approx(value, rel=tol, abs=tol), key
    flat_a = [v for row in pers_a["per_client"] for v in row]
    flat_b = [v for row in pers_b["per_client"] for v in row]
    assert flat_b == pytest.approx(flat_a, rel=tol, abs=tol)


BATCHABLE = ["fedavg", "fedbabu", "mhmd", "fedper", "lg_fedavg", "mhmd_one_way"]


@pytest.mark.parametrize("algorithm", BATCHABLE)
def test_batched_federation_equals_sequential_float64(tmp_path, algorithm):
    args = ("--algorithm.name", algorithm, "--precision", "64-true")
    seq = run(tmp_path / "a", "inprocess", *args)
    bat = run(tmp_path / "b", "batched", *args)
    assert seq[0].runtime.batch_clients == 0 and bat[0].runtime.batch_clients == 4  # all phases batched
    assert_same_federation(seq, bat, 1e-10)


@pytest.mark.parametrize("algorithm", ["mhmd", "fedper"])
def test_batched_federation_dirichlet_running_stats(tmp_path, algorithm):
    args = ("--algorithm.name", algorithm, "--precision", "64-true", "--data.partition", "dirichlet",
            "--data.alpha", "0.5", "--model.options", "{width: 8, track_running_stats: true}")
    seq = run(tmp_path / "a", "inprocess", *args)
    bat = run(tmp_path / "b", "batched", *args, "--batched.max_clients", "1")
    assert len(set(seq[0].runtime.train_sizes.tolist())) > 1  # clients of different sizes
    assert_same_federation(seq, bat, 1e-10)


def test_batched_federation_float32_chunks(tmp_path):
    seq = run(tmp_path / "a", "inprocess")
    bat = run(tmp_path / "b", "batched", "--batched.max_clients", "3")
    assert_same_federation(seq, bat, 1e-4)


@pytest.mark.parametrize("algorithm", ["ditto", "fedrep", "perfedavg"])
def test_unbatchable_algorithm_refused_at_validation(tmp_path, algorithm):
    with pytest.raises(ConfigError, match=r"backend: .*cannot run on the batched engine.*use backend: inprocess"):
        load_config("configs/smoke.yaml", ["--algorithm.name", algorithm, "--backend", "batched",
                                           "--run_dir", str(tmp_path)])


@pytest.mark.parametrize("model,options", [("cnn4", {"width": 8, "input_size": 16}), ("resnet50", {})])
def test_batched_update_equals_sequential_with_historic_heads(model, options):
    """The historic head layouts (ResNet-50: separate scalers on the aux heads and a scaled final head; ResNet-18 has
    the same scaler heads) run on the batched engine and give the sequential engine's result (float64, one step of
    batch 2: in float32 BatchNorm over so few values leaves ~1e-2 noise in ResNet-50's update); FedBABU's freezing
    (part body) keeps every scaler fixed there too."""
    torch.manual_seed(0)
    module = MultiHeadClassifier(model=model, num_classes=5, model_options={**options, "head_layout": "historic"},
                                 lr=0.05, momentum=0.9).double()
    starts = [module.get_state("full") for _ in range(2)]  # the clients differ by their data
    streams = client_streams([[2], [2]], torch.float64)
    sequential = [module.local_update(s, state=st, train_part="body", lr=0.05, return_head=True)
                  for s, st in zip(streams, starts)]
    batched = batched_local_update(module, starts, streams, train_part="body", lr=0.05, return_head=True)
    for seq, bat, st in zip(sequential, batched, starts):
        assert max_state_err(seq.body_state, bat.body_state) < 1e-10
        assert rel_err(seq.body_state["conv1.weight" if model == "resnet50" else "conv0.0.weight"],
                       st["conv1.weight" if model == "resnet50" else "conv0.0.weight"]) > 0  # it did train
        scalers = [k for k in bat.head_state if "scaler" in k]
        assert len(scalers) == {"cnn4": 0, "resnet50": 8}[model]
        assert all(torch.equal(bat.head_state[k], st[k]) for k in bat.head_state)
        assert bat.metrics["loss"] == pytest.approx(seq.metrics["loss"], rel=1e-10)
    # the stacked forward of batched evaluation returns the whole output, final_scaled included
    net = module.net.eval()
    models = StackedModels.stack([bat.body_state | bat.head_state for bat in batched], list(net.state_dict()))
    x = torch.stack([streams[0][0][0], streams[1][0][0]])
    out = stacked_forward(net, models, x)
    assert out.final.shape == (2, 2, 5) and len(out.final_scaled) == (1 if model == "resnet50" else 0)
    net.load_state_dict(models.state(1))
    with torch.no_grad():
        torch.testing.assert_close(out.final[1], net(x[1]).final, rtol=1e-10, atol=1e-12)


def test_compiled_step_equals_eager_and_is_reused():
    """``compile``: the torch.compile'd vmapped step (aot_eager here: the graph dynamo captures, without inductor's
    code generation, which a CPU test cannot afford) gives the eager engine's updates, clients of unequal sizes
    included; a second call (the next round) reuses the compiled step instead of compiling again."""
    from lightning_modules import batched

    torch.manual_seed(0)
    module = MultiHeadClassifier(model="cnn4", num_classes=5, model_options={"width": 4, "input_size": 16},
                                 lr=0.05, momentum=0.9).double()
    starts = perturbed_starts(module, 3)
    streams = client_streams([[8, 5], [8, 5], [8]], torch.float64)
    eager = batched_local_update(module, starts, streams, train_part="body", lr=0.05)
    compiled = batched_local_update(module, starts, streams, train_part="body", lr=0.05, compile="default",
                                    compile_backend="aot_eager")
    for e, c in zip(eager, compiled):
        assert max_state_err(e.body_state, c.body_state) < 1e-10
        assert c.metrics == pytest.approx(e.metrics, rel=1e-10)
    steps = batched._COMPILED_STEPS[module]
    assert len(steps) == 1
    again = batched_local_update(module, starts, streams, train_part="body", lr=0.05, compile="default",
                                 compile_backend="aot_eager")
    assert batched._COMPILED_STEPS[module] is steps and len(steps) == 1
    assert all(torch.equal(a.body_state[k], c.body_state[k]) for a, c in zip(again, compiled) for k in a.body_state)
    with pytest.raises(ValueError, match="compile must be one of"):
        batched_local_update(module, starts, streams, compile="fast")


def test_compile_needs_the_batched_backend(tmp_path):
    with pytest.raises(ConfigError, match=r"batched\.compile: .*set backend: batched or compile: off"):
        tiny_config(tmp_path, "--batched.compile", "default")


def test_a_round_and_fine_tuning_that_run_out_of_memory_continue_in_smaller_chunks(tmp_path, monkeypatch):
    """backend batched with every client at once (max_clients 0) on a device where only 2 fit: the first round's
    computation of 4 clients fails with an out-of-memory error, is run again as 2 + 2, and the run equals one with
    batched.max_clients 2 from the start, bit for bit (training, evaluation, fine-tuning)."""
    from orchestrator import clients

    def two_fit(module, starts, *args, **kwargs):
        if len(starts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return batched_local_update(module, starts, *args, **kwargs)

    want = run(tmp_path / "fixed", "batched", "--batched.max_clients", "2")
    monkeypatch.setattr(clients, "batched_local_update", two_fit)
    cfg = tiny_config(tmp_path / "auto", *TINY, "--backend", "batched")
    lines: list[str] = []
    fed = Federation(cfg, tmp_path / "auto", log=lines.append)
    assert fed.runtime.batch_clients == 4
    engine = make_backend("batched", cfg, fed.run_dir, fed.runtime, fed.algorithm)
    logs = [fed.run_round(engine) for _ in range(3)]
    got = (fed, logs, fed.evaluate(), fed.personalize())
    assert fed.runtime.batch_clients == 2
    assert [x for x in lines if "do not fit" in x] == [
        "batched engine: 4 clients at once do not fit the device's memory; 2 per computation from now on "
        "(set batched.max_clients: 2 to start there)"]
    assert_same_federation(want, got, 1e-300)  # equal (the helper compares with "< tol")

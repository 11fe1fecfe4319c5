"""The client LightningModule: standalone Trainer training on real images, and the federated ``local_update``.

The reference for ``local_update`` is a bare PyTorch loop: SGD with two parameter groups (body at lr, heads at
head lr -- 0 when frozen), momentum 0.9, the MHMD loss, zero_grad -> backward -> step (SPEC 2.4, 4, 5).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from fl_sd.losses import MultiHeadLoss, loss_config
from fl_sd.models import create_model, model_entry
from lightning_modules import (CIFAR10_MEAN, CIFAR10_STD, ArrayDataModule, ClientUpdate, MultiHeadClassifier,
                               NonFiniteLossError)

CIFAR10_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_mini.npz"
needs_cifar = pytest.mark.skipif(not CIFAR10_MINI.exists(), reason=f"{CIFAR10_MINI} not available")


# ---- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a 2-core machine shared with other busy processes, 2 OpenMP threads made a cnn4 step
    ~10x slower than 1 thread (barrier waits); unloaded, 1 thread costs < 2x. Keeps this file's runtime predictable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def image_batches(num_batches: int, batch_size: int, num_classes: int, seed: int = 0):
    """Normalised batches: real CIFAR-10 images when available (labels folded into K classes), else noise."""
    g = torch.Generator().manual_seed(seed)
    n = num_batches * batch_size
    if CIFAR10_MINI.exists():
        with np.load(CIFAR10_MINI) as d:
            idx = torch.randperm(len(d["train_labels"]), generator=g)[:n].numpy()
            x = torch.from_numpy(d["train_images"][idx]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(d["train_labels"][idx]) % num_classes
        x = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    else:
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return [(x[i * batch_size:(i + 1) * batch_size].contiguous(), y[i * batch_size:(i + 1) * batch_size])
            for i in range(num_batches)]


def make_module(model: str, k: int, seed: int = 0, **kwargs) -> MultiHeadClassifier:
    torch.manual_seed(seed)
    return MultiHeadClassifier(model, num_classes=k, **kwargs)


def bare_update(net, batches, body_lr: float, head_lr: float, loss_fn, momentum=0.9, weight_decay=0.0):
    """The reference's local update, verbatim in spirit: every parameter in SGD, frozen parts at lr 0."""
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD([{"params": list(net.body_parameters()), "lr": body_lr},
                           {"params": list(net.head_parameters()), "lr": head_lr}],
                          lr=body_lr, momentum=momentum, weight_decay=weight_decay)
    net.train()
    for x, y in batches:
        loss = loss_fn(net(x), y).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def reference_loss(model: str):
    return MultiHeadLoss(loss_config("mhmd", **model_entry(model).default_loss))


# ---- standalone: a plain pl.Trainer on real images -------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_on_cifar10_mini():
    pl.seed_everything(0, workers=True)
    dm = ArrayDataModule.from_npz(CIFAR10_MINI, CIFAR10_MEAN, CIFAR10_STD, batch_size=50)
    module = MultiHeadClassifier("cnn4", num_classes=10, lr=0.05)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, dm)
    fit_keys = set(trainer.callback_metrics)
    results = trainer.test(module, dm, verbose=False)[0]
    return module, fit_keys, results, set(trainer.callback_metrics)


@needs_cifar
def test_trainer_learns_cifar10_mini(trained_on_cifar10_mini):
    _, _, results, _ = trained_on_cifar10_mini
    print(f"\ncnn4 on cifar10_mini, 2 epochs: test/acc_final = {results['test/acc_final']:.4f}, "
          f"aux = {[round(results[f'test/acc_aux{i}'], 4) for i in range(3)]}")
    # 10 classes: chance is 10%; 2 epochs on the 5,482 real training images reach ~40% (see docs/RESULTS.md).
    assert results["test/acc_final"] > 0.30, results
    assert np.isfinite(results["test/loss"])


@needs_cifar
def test_trainer_logs_every_head(trained_on_cifar10_mini):
    module, fit_keys, results, test_keys = trained_on_cifar10_mini
    heads = ["final"] + [f"aux{i}" for i in range(module.net.num_aux_heads)]
    assert module.net.num_aux_heads == 3
    for stage, keys in (("train", fit_keys), ("val", fit_keys), ("test", test_keys)):
        for head in heads:
            assert f"{stage}/acc_{head}" in keys, (stage, head, sorted(keys))
        for part in ("loss", "loss_ce_final", "loss_ce_aux", "loss_kd_self", "loss_kd_mutual"):
            assert f"{stage}/{part}" in keys
        for i in range(3):
            assert f"{stage}/temp_aux{i}" in keys
    for i in range(3):
        assert 0.0 < results[f"test/temp_aux{i}"] < 1.0
        assert 0.0 <= results[f"test/acc_aux{i}"] <= 1.0


def test_trainer_path_freezes_like_local_update():
    """configure_optimizers holds exactly the trainable parts, and a Trainer 'body' run leaves the heads unchanged."""
    module = make_module("cnn4", 10, train_part="body", lr=0.05)
    opt = module.configure_optimizers()
    trainable = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trainable == {id(p) for p in module.net.body_parameters()}
    assert all(not p.requires_grad for p in module.net.head_parameters())
    heads = module.get_state("head")
    batches = image_batches(3, 16, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])), batch_size=16)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    after = module.get_state("head")
    assert all(torch.equal(heads[k], after[k]) for k in heads)
    # head mode: only the heads, at head_lr
    module.set_train_part("head", lr=0.01, head_lr=0.2)
    groups = module.configure_optimizers().param_groups
    assert [g["name"] for g in groups] == ["head"] and groups[0]["lr"] == 0.2
    module.set_train_part("full", lr=0.03)
    groups = module.configure_optimizers().param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("body", 0.03), ("head", 0.03)]


# ---- local_update == a bare PyTorch loop -----------------------------------------------------------------------------
@pytest.mark.parametrize("model,k,batch", [("cnn4", 10, 16), ("mobilenet", 100, 8)])
@pytest.mark.parametrize("part", ["body", "full"])
def test_local_update_matches_bare_loop(deterministic, model, k, batch, part):
    module = make_module(model, k, train_part=part, lr=0.05)
    init = {k_: v.clone() for k_, v in module.net.state_dict().items()}
    ref = create_model(model, num_classes=k)
    ref.load_state_dict(init)
    batches = image_batches(3, batch, k)

    update = module.local_update(batches)
    bare_update(ref, batches, 0.05, 0.0 if part == "body" else 0.05, reference_loss(model))

    ref_state = ref.state_dict()
    got = {**update.body_state, **module.get_state("head")}
    assert max_abs_diff(got, ref_state) <= 1e-6
    assert max_abs_diff(module.net.state_dict(), ref_state) <= 1e-6
    body_changed = max(((init[k_] - ref_state[k_]).abs().max().item()) for k_ in update.body_state
                       if init[k_].is_floating_point())
    assert body_changed > 1e-4  # the comparison is not vacuous
    for key in module.net.head_state_keys():
        if part == "body":
            assert torch.equal(module.net.state_dict()[key], init[key])  # bitwise unchanged
        else:
            assert not torch.equal(module.net.state_dict()[key], init[key])
    assert update.num_steps == 3 and update.num_samples == 3 * batch


# ---- frozen parts never change ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model,k", [("cnn4", 10), ("mobilenet", 100)])
def test_frozen_parts_never_change(model, k):
    module = make_module(model, k, weight_decay=5e-4)
    batches = image_batches(2, 8, k)
    init = {k_: v.clone() for k_, v in module.net.state_dict().items()}
    params = {n for n, _ in module.net.named_parameters()}

    module.local_update(batches, train_part="body", lr=0.1)
    state = module.net.state_dict()
    for key in module.net.head_state_keys():
        assert torch.equal(state[key], init[key]), key

    module.load_state(init)
    update = module.local_update(batches, train_part="head", lr=0.1, return_head=True)
    state = module.net.state_dict()
    for key in module.net.body_state_keys():
        if key in params:
            assert torch.equal(state[key], init[key]), key
    assert any(not torch.equal(update.head_state[key], init[key]) for key in module.net.head_state_keys())
    # BatchNorm running statistics are body *buffers*: train mode updates them in head fine-tuning too, exactly as
    # the reference (net.train() whatever the learning rates). Documented in docs/METHOD.md.
    running = [key for key in module.net.body_state_keys() if key.endswith("running_mean")]
    assert running and all(not torch.equal(state[key], init[key]) for key in running)


# ---- the same module object serves client after client ---------------------------------------------------------------
def test_local_update_twice_starts_from_given_state(deterministic):
    a = make_module("cnn4", 10, train_part="body", lr=0.05, seed=0)
    state1 = a.get_state("body")
    state2 = make_module("cnn4", 10, seed=1).get_state("body")
    batches = image_batches(3, 16, 10, seed=3)
    live = [p for p in a.net.parameters()]
    ptrs = [p.data_ptr() for p in live]

    first = a.local_update(batches, body_state=state1)
    second = a.local_update(batches, body_state=state2)

    # a fresh module started from state2 (fresh optimizer, no momentum history) gives the same result
    b = make_module("cnn4", 10, train_part="body", lr=0.05, seed=0)
    fresh = b.local_update(batches, body_state=state2)
    assert max_abs_diff(second.body_state, fresh.body_state) == 0.0
    assert max_abs_diff(first.body_state, second.body_state) > 1e-3
    # loaded in place: same parameter objects and storage
    assert [p for p in a.net.parameters()] == live and [p.data_ptr() for p in live] == ptrs
    # returned states are detached clones, not views of the live weights
    key = next(iter(second.body_state))
    assert second.body_state[key].data_ptr() != a.net.state_dict()[key].data_ptr()
    assert not any(t.requires_grad for t in second.body_state.values())
    # running again from state1 reproduces the first update
    again = a.local_update(batches, body_state=state1)
    assert max_abs_diff(first.body_state, again.body_state) == 0.0


def test_local_update_result_and_no_trainer(monkeypatch):
    module = make_module("cnn4", 10, train_part="body")

    def no_log(*args, **kwargs):
        raise AssertionError("self.log must not be called on the local_update path")

    monkeypatch.setattr(module, "log", no_log)
    module.eval()
    batches = image_batches(4, 10, 10)
    update = module.local_update(batches, num_samples=20)
    assert isinstance(update, ClientUpdate)
    assert not module.net.training  # mode restored
    assert all(p.grad is None for p in module.net.parameters())  # gradients released
    assert set(update.body_state) == set(module.net.body_state_keys())
    assert any("running_var" in k_ for k_ in update.body_state)
    assert update.head_state is None and update.num_steps == 4 and update.num_samples == 20
    assert module.local_update(batches).num_samples == 40
    expected = {"loss", "loss_ce_final", "loss_ce_aux", "loss_kd_self", "loss_kd_mutual", "acc_final",
                "acc_aux0", "acc_aux1", "acc_aux2", "temp_aux0", "temp_aux1", "temp_aux2"}
    assert set(update.metrics) == expected
    assert all(isinstance(v, float) for v in update.metrics.values())
    m = update.metrics
    assert abs(m["loss"] - (m["loss_ce_final"] + m["loss_ce_aux"] + m["loss_kd_self"] + m["loss_kd_mutual"])) < 1e-4
    assert 0 <= m["acc_final"] <= 1 and all(0 < m[f"temp_aux{i}"] < 1 for i in range(3))
    with pytest.raises(KeyError, match="not a body state key"):
        module.local_update(batches, body_state=module.get_state("head"))
    with pytest.raises(ValueError, match="no batches"):
        module.local_update([])


def test_on_epoch_end_callback(deterministic):
    """Called after each epoch; an evaluation inside it (eval mode, no grad) does not change the training."""
    batches = image_batches(6, 8, 10)
    plain = make_module("cnn4", 10, train_part="full", lr=0.05).local_update(batches)
    module = make_module("cnn4", 10, train_part="full", lr=0.05)
    seen = []

    def evaluate(epoch: int) -> None:
        assert module.net.training  # still in train mode when called
        module.net.eval()
        with torch.no_grad():
            module.net(batches[0][0])
        seen.append(epoch)

    update = module.local_update(batches, steps_per_epoch=2, on_epoch_end=evaluate)
    assert seen == [1, 2, 3]
    assert max_abs_diff(update.body_state, plain.body_state) == 0.0
    with pytest.raises(ValueError, match="steps_per_epoch"):
        module.local_update(batches, on_epoch_end=evaluate)


def test_state_cache_follows_dtype_change():
    module = make_module("cnn4", 10, train_part="body")
    module.local_update(image_batches(1, 8, 10))
    module.to(torch.float64)  # replaces buffer tensors; the cached references must be dropped
    batches = [(x.double(), y) for x, y in image_batches(2, 8, 10)]
    update = module.local_update(batches)
    live = module.net.state_dict()
    assert all(torch.equal(update.body_state[k_], live[k_]) for k_ in update.body_state)
    assert update.body_state["conv0.1.running_mean"].dtype == torch.float64


# ---- divergence ------------------------------------------------------------------------------------------------------
def test_nan_loss_raises_naming_the_step():
    module = make_module("cnn4", 10, train_part="body")
    batches = image_batches(4, 8, 10)
    bad = batches[1][0].clone()
    bad[0, 0, 0, 0] = float("nan")
    batches[1] = (bad, batches[1][1])
    with pytest.raises(FloatingPointError, match="step 2 of 4") as info:
        module.local_update(batches)
    assert isinstance(info.value, NonFiniteLossError) and info.value.step == 2


# ---- configuration ---------------------------------------------------------------------------------------------------
def test_loss_defaults_come_from_the_model():
    assert make_module("cnn4", 10).loss_fn.config.aux_weight == 0.01
    assert make_module("cnn4", 10, loss="ce").loss_fn.config.aux_weight == 0.0
    assert make_module("cnn4", 10, loss_options={"aux_weight": 2.0}).loss_fn.config.aux_weight == 2.0
    net = create_model("cnn4", num_classes=10)
    assert MultiHeadClassifier(net=net).loss_fn.config.aux_weight == 0.01
    with pytest.raises(ValueError, match="train_part"):
        make_module("cnn4", 10, train_part="heads")
    with pytest.raises(ValueError, match="unknown loss preset"):
        make_module("cnn4", 10, loss="nope")


# ---- one local loop: per-call settings, hooks ------------------------------------------------------------------------
def test_local_update_leaves_nothing_set_on_the_module():
    module = make_module("cnn4", 10, train_part="body", lr=0.1)
    loss_before, flags = module.loss_fn, {n: p.requires_grad for n, p in module.net.named_parameters()}
    module.local_update(image_batches(2, 8, 10), train_part="head", lr=0.5, head_lr=0.3,
                        loss=loss_config("ce"), return_head=True)
    assert (module.train_part, module.lr, module.effective_head_lr) == ("body", 0.1, 0.1)
    assert module.loss_fn is loss_before
    assert {n: p.requires_grad for n, p in module.net.named_parameters()} == flags
    with pytest.raises(ValueError, match="train_part"):
        module.local_update(image_batches(1, 8, 10), train_part="legs")
    assert {n: p.requires_grad for n, p in module.net.named_parameters()} == flags


def test_local_update_loss_argument_is_used():
    batches = image_batches(2, 8, 10)
    a, b = make_module("cnn4", 10, lr=0.05), make_module("cnn4", 10, lr=0.05)
    ce = a.local_update(batches, loss=loss_config("ce"))
    b.loss_fn = MultiHeadLoss(loss_config("ce"))  # the same loss, set on the module
    ref = b.local_update(batches)
    assert max_abs_diff(ce.body_state, ref.body_state) == 0.0 and ce.metrics["loss_ce_aux"] == 0.0


def test_step_hooks_gradient_skip_after_and_record():
    from fl_sd.hooks import StepHooks, named_params

    batches = image_batches(4, 8, 10)
    calls = []

    class Hooks(StepHooks):
        def before_step(self, step, optimizer):
            calls.append(("before", step, sorted({g["name"] for g in optimizer.param_groups})))
            with torch.no_grad():
                for name, p, _ in named_params(optimizer):
                    p.grad.add_(0.5 * p)  # weight decay 0.5, by hand
            return step == 3  # skip the last step

        def after_step(self, step, optimizer):
            calls.append(("after", step))

        def record(self, step):
            return step % 2 == 0

    module = make_module("cnn4", 10, train_part="full", lr=0.05)
    start = module.get_state("full")
    update = module.local_update(batches, hooks=Hooks(), return_head=True)
    assert [c[:2] for c in calls] == [(w, s) for s in range(4) for w in ("before", "after")]
    assert calls[0][2] == ["body", "head"]
    assert update.num_steps == 2 and update.num_samples == 16  # steps 0 and 2 recorded
    # = SGD with weight decay 0.5 for three steps: the fourth is skipped (its forward still updates BN statistics)
    ref = make_module("cnn4", 10, train_part="full", lr=0.05, weight_decay=0.5)
    ref.load_state(start)
    ref.local_update(batches[:3])
    params = [n for n, _ in module.net.named_parameters()]
    got, want = {**update.body_state, **update.head_state}, ref.get_state("full")
    assert max_abs_diff({k: got[k] for k in params}, {k: want[k] for k in params}) < 1e-6


def test_get_state_parts():
    module = make_module("cnn4", 10)
    full = module.get_state("full")
    assert set(full) == set(module.net.state_dict())
    assert set(module.get_state("body")) | set(module.get_state("head")) == set(full)
    with pytest.raises(ValueError, match="unknown model part 'legs'"):
        module.get_state("legs")


# ---- Lightning checkpoints rebuild the same network, however it was built ------------------------------------------
@pytest.mark.parametrize("built", ["by name", "net from the registry", "net from its class"])
def test_lightning_checkpoint_loads_back_an_identical_module(tmp_path, built):
    from fl_sd.models.cnn import CNNCifar

    torch.manual_seed(0)
    if built == "by name":
        module = MultiHeadClassifier("cnn4", num_classes=7, model_options={"width": 8}, lr=0.02)
    elif built == "net from the registry":
        module = MultiHeadClassifier(net=create_model("cnn4", num_classes=7, width=8), lr=0.02)
    else:
        module = MultiHeadClassifier(net=CNNCifar(7, width=8, track_running_stats=False), lr=0.02)
    x = torch.randint(0, 255, (40, 32, 32, 3), dtype=torch.uint8).numpy()
    y = (np.arange(40) % 7).astype(np.int64)
    dm = ArrayDataModule(x, y, x, y, CIFAR10_MEAN, CIFAR10_STD, batch_size=20)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = MultiHeadClassifier.load_from_checkpoint(path, weights_only=False)
    assert type(loaded.net) is type(module.net) and loaded.net.num_classes == 7
    assert loaded.net.build_options() == module.net.build_options()
    assert loaded.net.state_dict().keys() == module.net.state_dict().keys()
    assert max_abs_diff(loaded.net.state_dict(), module.net.state_dict()) == 0.0
    assert loaded.lr == 0.02 and loaded.hparams.model == "cnn4"


def test_from_npz_uses_the_federated_loader_and_statistics():
    from fl_sd.data import load_npz

    if not CIFAR10_MINI.exists():
        pytest.skip(f"{CIFAR10_MINI} not available")
    ds = load_npz(CIFAR10_MINI)
    dm = ArrayDataModule.from_npz(CIFAR10_MINI)
    norm = dm.train_set.transform.transforms[-1]
    assert tuple(norm.mean) == ds.mean and tuple(norm.std) == ds.std
    with pytest.raises(ValueError, match="does not exist"):
        ArrayDataModule.from_npz(CIFAR10_MINI.parent / "missing.npz")


# ---- head layouts: every layout trains through local_update; FedBABU's freezing keeps the scalers fixed --------------
@pytest.mark.parametrize("layout", ["fixed", "historic"])
@pytest.mark.parametrize("model", ["cnn4", "resnet18", "resnet50"])
def test_local_update_under_each_head_layout(model, layout):
    k = 10
    module = make_module(model, k, model_options={"head_layout": layout})
    assert module.net.head_layout == layout
    batches = image_batches(1, 2, k)
    init = {k_: v.clone() for k_, v in module.net.state_dict().items()}
    update = module.local_update(batches, train_part="body", lr=0.1)
    state = module.net.state_dict()
    head_keys = module.net.head_state_keys()
    if layout == "historic" and model != "cnn4":
        assert any(".scaler." in key for key in head_keys)
    for key in head_keys:  # final head, aux heads and their scalers: bitwise unchanged
        assert torch.equal(state[key], init[key]), key
    assert any(not torch.equal(update.body_state[key], init[key]) for key in update.body_state
               if init[key].is_floating_point())
    assert np.isfinite(update.metrics["loss"])
    if model == "resnet50":  # its default loss has the scaler on: fine-tuning (full) trains every scaler
        module.load_state(init)
        full = module.local_update(batches, train_part="full", lr=0.1, return_head=True)
        scalers = [key for key in head_keys if "scaler" in key]
        assert len(scalers) == (8 if layout == "historic" else 0)
        for key in scalers:
            assert not torch.equal(full.head_state[key], init[key]), key

"""Tests of the multi-head model zoo (SPEC section 2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fl_sd.losses import MultiHeadLoss, loss_config
from fl_sd.models import MultiHeadNet, MultiHeadOutput, create_model, list_models, model_entry


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

MODELS = list_models()
CLASS_COUNTS = (2, 7, 10, 100)
B = 3  # batch size used throughout; small keeps the suite fast on 2 CPU cores


def make(name: str, num_classes: int = 10, **options) -> MultiHeadNet:
    return create_model(name, num_classes=num_classes, **options)


def images(batch: int = B, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, channels, size, size)


def aux_feature_modules(model: MultiHeadNet) -> list[nn.Module]:
    """The body module whose output each auxiliary head should read (SPEC 2.1-2.3 and the fl-sd decisions)."""
    name = type(model).__name__
    if name == "CNNCifar":
        return [model.conv0, model.conv1, model.conv2]
    if name == "MobileNetCifar":
        return [model.layers[i] for i in (3, 6, 9)]
    if name in ("ResNet18Cifar", "ResNet50Cifar"):
        return [model.layer1, model.layer2, model.layer3]
    raise AssertionError(f"no expectation written for model class {name}")


def last_body_module(model: MultiHeadNet) -> nn.Module:
    name = type(model).__name__
    return {"CNNCifar": lambda m: m.conv3, "MobileNetCifar": lambda m: m.layers[12],
            "ResNet18Cifar": lambda m: m.layer4, "ResNet50Cifar": lambda m: m.layer4}[name](model)


#: (channels, spatial side for a 32x32 input) of the feature each aux head reads.
AUX_FEATURE_SHAPES = {"cnn4": [(64, 16), (64, 8), (64, 4)],
                      "mobilenet": [(256, 8), (512, 4), (512, 4)],
                      "resnet18": [(64, 32), (128, 16), (256, 8)],
                      "resnet50": [(256, 32), (512, 16), (1024, 8)]}


def test_registry_lists_the_models():
    assert set(MODELS) >= {"cnn4", "mobilenet", "resnet18", "resnet50"}
    assert MODELS == sorted(MODELS)
    for name in MODELS:
        assert name in AUX_FEATURE_SHAPES, f"add expectations for new model {name!r}"


# --- output structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("name", MODELS)
def test_output_structure(name, num_classes):
    model = make(name, num_classes)
    assert isinstance(model, MultiHeadNet)
    assert model.num_classes == num_classes
    assert model.num_aux_heads == 3
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            out = model(images())
        assert isinstance(out, MultiHeadOutput)
        assert out.final.shape == (B, num_classes)
        assert len(out.aux) == len(out.aux_raw) == len(out.temperature) == 3
        for a, u, t in zip(out.aux, out.aux_raw, out.temperature):
            assert a.shape == (B, num_classes)
            assert u.shape == (B, num_classes)
            assert t.shape == (B,)
            assert torch.isfinite(a).all() and torch.isfinite(u).all()
            assert ((t > 0) & (t < 1)).all()
        assert torch.isfinite(out.final).all()
        # the three heads are different projections of different features: no two raw outputs coincide
        for i in range(3):
            for j in range(i + 1, 3):
                assert not torch.allclose(out.aux_raw[i], out.aux_raw[j])


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
@pytest.mark.parametrize("name", MODELS)
def test_train_mode_scales_aux_by_temperature(name, num_classes):
    model = make(name, num_classes).train()
    with torch.no_grad():
        out = model(images())
    for a, u, t in zip(out.aux, out.aux_raw, out.temperature):
        torch.testing.assert_close(a, u / t[:, None], rtol=0, atol=0)
        # 1/sigmoid(s) > 1: the scaled logits are sharpened, never flattened
        assert (a.abs() >= u.abs()).all()
        assert (a.argmax(1) == u.argmax(1)).all()


@pytest.mark.parametrize("num_classes", (2, 10, 100))
@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_serves_unscaled_aux(name, num_classes):
    model = make(name, num_classes).eval()
    with torch.no_grad():
        out = model(images())
    for a, u, t in zip(out.aux, out.aux_raw, out.temperature):
        assert torch.equal(a, u)
        assert not torch.allclose(a, u / t[:, None], rtol=1e-3, atol=0)  # i.e. the scaling really is switched off


@pytest.mark.parametrize("name", MODELS)
def test_scale_aux_false_leaves_aux_unscaled_in_training(name):
    model = make(name, 10, scale_aux=False).train()
    assert model.scale_aux is False
    out = model(images())
    for a, u, t in zip(out.aux, out.aux_raw, out.temperature):
        assert torch.equal(a, u)
        assert ((t > 0) & (t < 1)).all()  # the temperature is still reported


# --- which features the heads read ---------------------------------------------------------------------------

@pytest.mark.parametrize("training", (True, False))
@pytest.mark.parametrize("name", MODELS)
def test_aux_heads_read_the_intended_features(name, training):
    num_classes = 7
    model = make(name, num_classes).train(training)
    captured: dict[str, torch.Tensor] = {}

    def save_output(key):
        def hook(module, args, output):
            captured[key] = output.detach().clone()
        return hook

    def save_io(key):
        def hook(module, args, output):
            captured[key + ".in"] = args[0].detach().clone()
            captured[key + ".out"] = output.detach().clone()
        return hook

    handles = [m.register_forward_hook(save_output(f"feat{l}")) for l, m in enumerate(aux_feature_modules(model))]
    handles += [h.fc.register_forward_hook(save_io(f"fc{l}")) for l, h in enumerate(model.aux_heads)]
    handles.append(last_body_module(model).register_forward_hook(save_output("last")))
    handles.append(model.classifier.register_forward_hook(save_io("cls")))
    with torch.no_grad():
        out = model(images())
    for h in handles:
        h.remove()

    for l, (channels, side) in enumerate(AUX_FEATURE_SHAPES[name]):
        feat = captured[f"feat{l}"]
        assert feat.shape == (B, channels, side, side)
        head = model.aux_heads[l]
        assert head.fc.in_features == channels
        assert head.fc.out_features == num_classes + 1
        torch.testing.assert_close(captured[f"fc{l}.in"], feat.mean(dim=(2, 3)))
        # not the conv0 / first-block feature for every head (the reference CNN/ResNet bug)
        if l > 0:
            first = captured["feat0"].mean(dim=(2, 3))
            assert captured[f"fc{l}.in"].shape != first.shape or not torch.allclose(captured[f"fc{l}.in"], first)
        # the Linear output z splits into class logits z[:, :K] and the temperature logit s = z[:, K]
        z = captured[f"fc{l}.out"]
        torch.testing.assert_close(out.aux_raw[l], z[:, :num_classes], rtol=0, atol=0)
        torch.testing.assert_close(out.temperature[l], torch.sigmoid(z[:, num_classes]), rtol=0, atol=0)
        expected_aux = z[:, :num_classes] / torch.sigmoid(z[:, num_classes])[:, None] if training \
            else z[:, :num_classes]
        torch.testing.assert_close(out.aux[l], expected_aux)

    # the final head reads the deepest feature: GAP (MobileNet, ResNet) or flatten (CNN)
    last = captured["last"]
    expected_in = last.flatten(1) if name == "cnn4" else last.mean(dim=(2, 3))
    torch.testing.assert_close(captured["cls.in"], expected_in)
    torch.testing.assert_close(out.final, captured["cls.out"], rtol=0, atol=0)


# --- gradients -----------------------------------------------------------------------------------------------

def _pre_bn_bias_names(model: MultiHeadNet) -> set[str]:
    """Biases of convs directly followed by BatchNorm: in train mode BN cancels any constant per-channel shift,
    so their gradient is mathematically zero (the 4-conv CNN has such biases, as in the reference)."""
    names = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            kids = list(module.children())
            for a, b in zip(kids, kids[1:]):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and a.bias is not None:
                    names.add(f"{mod_name}.{kids.index(a)}.bias")
    return names


def _loss(model, x, num_classes):
    y = torch.randint(0, num_classes, (x.shape[0],))
    return MultiHeadLoss(loss_config("mhmd"))(model(x), y).total


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_body_parameter(name):
    num_classes = 10
    model = make(name, num_classes).train()
    loss = _loss(model, images(4), num_classes)
    assert torch.isfinite(loss)
    loss.backward()
    pre_bn = _pre_bn_bias_names(model)
    head_ids = {id(p) for p in model.head_parameters()}
    body = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    assert body
    scale = max(p.grad.abs().max().item() for _, p in body)
    for n, p in body:
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if n in pre_bn:
            assert p.grad.abs().max().item() < 1e-4 * scale, n  # cancelled by the train-mode BN
        else:
            assert p.grad.abs().sum() > 0, n
    for p in model.head_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    if name == "cnn4":
        assert pre_bn == {f"conv{i}.0.bias" for i in range(4)}


@pytest.mark.parametrize("name", MODELS)
def test_eval_mode_backward_reaches_every_body_parameter(name):
    """With BN on running statistics nothing cancels: every body parameter, pre-BN biases included, gets gradient."""
    num_classes = 10
    model = make(name, num_classes).eval()
    _loss(model, images(2), num_classes).backward()
    for p in model.body_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_each_aux_head_backpropagates_only_up_to_its_depth(name):
    """Aux head l's output depends on the body up to its attachment point (not detached) and on nothing deeper."""
    model = make(name, 10).train()
    out = model(images(2))
    modules = aux_feature_modules(model)
    for l in range(3):
        model.zero_grad(set_to_none=True)
        out.aux[l].pow(2).sum().backward(retain_graph=True)
        weights = [p for p in modules[l].parameters() if p.dim() > 1]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in weights), l
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_heads[l].parameters())
        for deeper in [*modules[l + 1:], last_body_module(model), model.classifier]:
            assert all(p.grad is None for p in deeper.parameters()), l
        for k, other in enumerate(model.aux_heads):
            if k != l:
                assert all(p.grad is None for p in other.parameters())
    model.zero_grad(set_to_none=True)
    out.final.pow(2).sum().backward()
    assert all(p.grad is None for p in model.aux_heads.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in modules[0].parameters() if p.dim() > 1)


@pytest.mark.parametrize("name", MODELS)
def test_gradient_passes_through_frozen_heads(name):
    num_classes = 10
    model = make(name, num_classes).train()
    x = images(4)
    y = torch.randint(0, num_classes, (4,))
    criterion = MultiHeadLoss()

    criterion(model(x), y).total.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for p in model.head_parameters():
        p.requires_grad_(False)
    loss = criterion(model(x), y).total
    assert loss.requires_grad
    loss.backward()
    head_ids = {id(p) for p in model.head_parameters()}
    for n, p in model.named_parameters():
        if id(p) in head_ids:
            assert p.grad is None, n
        else:
            assert p.grad is not None, n
            # freezing the heads does not change what the body receives
            torch.testing.assert_close(p.grad, reference[n], rtol=1e-4, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in model.body_parameters())


# --- parameter counts and head layout ------------------------------------------------------------------------

def n_params(module_or_iter) -> int:
    params = module_or_iter.parameters() if isinstance(module_or_iter, nn.Module) else module_or_iter
    return sum(p.numel() for p in params)


def test_mobilenet_k100_parameter_counts_match_spec():
    model = make("mobilenet", 100)
    assert n_params(model.body_parameters()) == 3_206_976
    assert n_params(model.head_parameters()) == 231_680
    assert [n_params(h) for h in model.aux_heads] == [25_856, 51_712, 51_712]
    assert n_params(model.classifier) == 102_400
    assert n_params(model) == 3_438_656


@pytest.mark.parametrize("num_classes", CLASS_COUNTS)
def test_mobilenet_head_layout(num_classes):
    model = make("mobilenet", num_classes)
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.bias is None
    assert (model.classifier.in_features, model.classifier.out_features) == (1024, num_classes)
    for head, channels in zip(model.aux_heads, (256, 512, 512)):
        assert head.fc.bias is None
        assert head.fc.weight.shape == (num_classes + 1, channels)
    assert n_params(model.body_parameters()) == 3_206_976  # the body does not depend on K
    assert n_params(model.head_parameters()) == 1280 * (num_classes + 1) + 1024 * num_classes
    assert make("mobilenet", num_classes, final_bias=True).classifier.bias.shape == (num_classes,)


@pytest.mark.parametrize("num_classes", (2, 10, 100))
def test_cnn4_parameter_counts_and_layout(num_classes):
    model = make("cnn4", num_classes)
    # conv0: 3*64*9 + 64, conv1..3: 64*64*9 + 64 each, four BN(64) affine pairs
    assert n_params(model.body_parameters()) == (1728 + 64) + 3 * (36_864 + 64) + 4 * 128
    assert model.classifier.bias is not None  # the 4-conv CNN's final Linear has a bias (SPEC 2.2)
    assert model.classifier.weight.shape == (num_classes, 256)
    for head in model.aux_heads:
        assert head.fc.bias is None and head.fc.weight.shape == (num_classes + 1, 64)
    for i in range(4):
        assert model.get_submodule(f"conv{i}.0").bias is not None


@pytest.mark.parametrize("num_classes", (10, 100))
def test_resnet18_parameter_counts_and_layout(num_classes):
    model = make("resnet18", num_classes)
    # the classic CIFAR ResNet-18 has 11,173,962 parameters with a Linear(512, 10) head
    assert n_params(model.body_parameters()) == 11_173_962 - 5130
    assert model.classifier.weight.shape == (num_classes, 512) and model.classifier.bias is not None
    for head, channels in zip(model.aux_heads, (64, 128, 256)):
        assert head.fc.bias is None and head.fc.weight.shape == (num_classes + 1, channels)


@pytest.mark.parametrize("num_classes", (10, 100))
def test_resnet50_parameter_counts_and_layout(num_classes):
    model = make("resnet50", num_classes)
    # the classic CIFAR ResNet-50 (Bottleneck [3, 4, 6, 3], 3x3 stem) has 23,520,842 parameters with Linear(2048, 10)
    assert n_params(model.body_parameters()) == 23_520_842 - 20_490
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [3, 4, 6, 3]
    assert model.classifier.weight.shape == (num_classes, 2048) and model.classifier.bias is not None
    for head, channels in zip(model.aux_heads, (256, 512, 1024)):
        assert head.fc.bias is None and head.fc.weight.shape == (num_classes + 1, channels)
    assert n_params(model.head_parameters()) == 1792 * (num_classes + 1) + 2049 * num_classes


def test_resnet50_stages_match_torchvision_bottleneck_layout():
    """Stage by stage the same convolutions and BatchNorms as torchvision's resnet50 (only the stem differs: 3x3
    without max-pool for 32x32 inputs)."""
    torchvision = pytest.importorskip("torchvision")
    ours, theirs = make("resnet50", 10), torchvision.models.resnet50(weights=None)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        a = [(type(m).__name__, tuple(p.shape)) for m in getattr(ours, name).modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for p in m.parameters()]
        b = [(type(m).__name__, tuple(p.shape)) for m in getattr(theirs, name).modules()
             if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for p in m.parameters()]
        assert sorted(a) == sorted(b), name
        strides = [m.stride for m in getattr(ours, name).modules() if isinstance(m, nn.Conv2d)]
        assert sorted(strides) == sorted(m.stride for m in getattr(theirs, name).modules()
                                         if isinstance(m, nn.Conv2d)), name
    assert n_params(ours.conv1) == 3 * 64 * 9 and n_params(theirs.conv1) == 3 * 64 * 49


@pytest.mark.parametrize("name", MODELS)
def test_default_initialisation_is_pytorch_default(name):
    model = make(name, 10)
    for head in model.aux_heads:
        bound = 1 / math.sqrt(head.fc.in_features)
        assert head.fc.weight.abs().max() <= bound
        assert head.fc.weight.std() > bound / 4  # not a degenerate init
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert m.momentum == 0.1 and m.eps == 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_identical_models(name):
    torch.manual_seed(123)
    a = make(name, 10)
    torch.manual_seed(123)
    b = make(name, 10)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --- body / head split ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("track", (True, False))
@pytest.mark.parametrize("name", MODELS)
def test_body_head_split(name, track):
    model = make(name, 10, track_running_stats=track)
    body = [id(p) for p in model.body_parameters()]
    head = [id(p) for p in model.head_parameters()]
    everything = [id(p) for p in model.parameters()]
    assert len(set(body)) == len(body) and len(set(head)) == len(head)
    assert not set(body) & set(head)
    assert set(body) | set(head) == set(everything)
    assert len(body) + len(head) == len(everything)
    assert n_params(model.head_parameters()) == n_params(model.classifier) + n_params(model.aux_heads)

    state = model.state_dict()
    expected_head = {f"classifier.{k}" for k in model.classifier.state_dict()} | \
                    {f"aux_heads.{k}" for k in model.aux_heads.state_dict()}
    head_keys, body_keys = model.head_state_keys(), model.body_state_keys()
    assert set(head_keys) == expected_head
    assert len(head_keys) == len(set(head_keys))
    assert not set(head_keys) & set(body_keys)
    assert set(head_keys) | set(body_keys) == set(state)
    assert all(model.is_head_key(k) for k in head_keys)
    assert not any(model.is_head_key(k) for k in body_keys)
    # every body parameter is a body key
    param_names = {n for n, p in model.named_parameters() if id(p) in set(body)}
    assert param_names <= set(body_keys)

    bn_modules = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn_modules
    stats = ("running_mean", "running_var", "num_batches_tracked")
    stat_keys = {k for k in body_keys if k.rsplit(".", 1)[-1] in stats}
    if track:
        assert stat_keys == {f"{m}.{s}" for m in bn_modules for s in stats}
    else:
        assert stat_keys == set()
        assert not any(k.rsplit(".", 1)[-1] in stats for k in state)
    # with no running statistics the body keys are exactly the body parameters
    if not track:
        assert set(body_keys) == param_names


@pytest.mark.parametrize("name", MODELS)
def test_track_running_stats_false_uses_batch_stats_in_eval(name):
    x = images(4)
    other = 3.0 * torch.randn(2, 3, 32, 32) + 2.0

    tracked = make(name, 10, track_running_stats=True)
    with torch.no_grad():
        tracked.train()(torch.randn(4, 3, 32, 32))  # move the running statistics away from (0, 1)
        tracked.eval()
        alone = tracked(x[:2])
        mixed = tracked(torch.cat([x[:2], other]))
    torch.testing.assert_close(alone.final, mixed.final[:2], rtol=1e-4, atol=1e-5)
    for a, m in zip(alone.aux_raw, mixed.aux_raw):
        torch.testing.assert_close(a, m[:2], rtol=1e-4, atol=1e-5)

    untracked = make(name, 10, track_running_stats=False)
    with torch.no_grad():
        untracked.eval()
        alone = untracked(x[:2])
        mixed = untracked(torch.cat([x[:2], other]))
        # in train mode the untracked model computes exactly what it computes in eval mode
        torch.testing.assert_close(untracked.train()(x[:2]).final, alone.final)
    assert not torch.allclose(alone.final, mixed.final[:2], rtol=1e-3, atol=1e-4)
    assert all(not torch.allclose(a, m[:2], rtol=1e-3, atol=1e-4) for a, m in zip(alone.aux_raw, mixed.aux_raw))


# --- other input shapes ---------------------------------------------------------------------------------------

def test_cnn4_fashion_mnist_shape():
    model = make("cnn4", 10, in_channels=1, input_size=28).train()
    assert model.conv0[0].in_channels == 1
    assert model.classifier.in_features == 64  # 28 -> 14 -> 7 -> 3 -> 1
    out = model(images(B, channels=1, size=28))
    assert out.final.shape == (B, 10)
    assert [a.shape for a in out.aux] == [(B, 10)] * 3
    with pytest.raises(Exception):
        model(images(B, channels=3, size=28))


@pytest.mark.parametrize("name", ("mobilenet", "resnet18", "resnet50"))
def test_single_channel_input(name):
    model = make(name, 10, in_channels=1).train()
    assert model.conv1.in_channels == 1
    for size in (28, 32):
        out = model(images(B, channels=1, size=size))
        assert out.final.shape == (B, 10)
        assert all(a.shape == (B, 10) and torch.isfinite(a).all() for a in out.aux)


def test_cnn4_rejects_too_small_input():
    with pytest.raises(ValueError, match="input_size"):
        make("cnn4", 10, input_size=8)


def test_mobilenet_aux_after_option():
    model = make("mobilenet", 10, aux_after=(1, 4))
    assert model.num_aux_heads == 2
    assert [h.fc.in_features for h in model.aux_heads] == [128, 256]
    with pytest.raises(ValueError, match="aux_after"):
        make("mobilenet", 10, aux_after=(3, 12))


# --- construction errors ----------------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(ValueError, match="no_such_net") as info:
        create_model("no_such_net", num_classes=10)
    for name in MODELS:
        assert name in str(info.value)  # the message lists the valid choices
    with pytest.raises(ValueError, match="no_such_net"):
        model_entry("no_such_net")


@pytest.mark.parametrize("name", MODELS)
def test_unknown_model_option(name):
    with pytest.raises(ValueError, match="bogus_option") as info:
        create_model(name, num_classes=10, bogus_option=3)
    assert name in str(info.value)


@pytest.mark.parametrize("bad", (1, 0, -3, 10.0, "10"))
@pytest.mark.parametrize("name", MODELS)
def test_bad_num_classes(name, bad):
    with pytest.raises(ValueError, match="num_classes"):
        create_model(name, num_classes=bad)


def test_registered_default_loss_settings():
    """SPEC 'Decisions': aux/KD weights per model; ResNet-18 ran without the scaler; ResNet-50 with aux 1, KD 1 and the
    scaler on (mode 10051; 10050 = the same with use_scaler false)."""
    expected = {"mobilenet": (10.0, 1.0, True), "cnn4": (0.01, 1.0, True), "resnet18": (0.01, 0.1, False),
                "resnet50": (1.0, 1.0, True)}
    for name, (aux_w, kd_w, scaler) in expected.items():
        cfg = loss_config("mhmd", **model_entry(name).default_loss)  # the defaults are valid loss options
        assert (cfg.aux_weight, cfg.kd_weight, cfg.use_scaler) == (aux_w, kd_w, scaler)
        assert model_entry(name).name == name and model_entry(name).description


# --- head_layout: historic (the reference's research code, SPEC 2.2-2.3) ---------------------------------------

HISTORIC = ("cnn4", "resnet18", "resnet50")


def _capture(model: MultiHeadNet, modules: dict[str, nn.Module], training: bool):
    """Run a forward pass and return (output, {name: module output}) of the given modules."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, args, out, key=key: seen.__setitem__(key, out.detach().clone()))
               for key, m in modules.items()]
    model.train(training)
    with torch.no_grad():
        out = model(images(2))
    for h in handles:
        h.remove()
    return out, seen


def test_head_layout_fixed_is_the_default_and_bad_values_are_refused():
    for name in HISTORIC:
        default, fixed = make(name, 10), make(name, 10, head_layout="fixed")
        assert default.head_layout == "fixed"
        assert default.state_dict().keys() == fixed.state_dict().keys()
        with pytest.raises(ValueError, match="head_layout"):
            make(name, 10, head_layout="paper")
    with pytest.raises(ValueError, match="head_layout"):  # MobileNet's heads are the reference's: no such option
        make("mobilenet", 10, head_layout="historic")


@pytest.mark.parametrize("training", (True, False))
def test_cnn4_historic_heads_all_read_conv0(training):
    model = make("cnn4", 7, head_layout="historic")
    assert [type(h).__name__ for h in model.aux_heads] == ["AuxHead"] * 3  # the same heads, other features
    out, seen = _capture(model, {"conv0": model.conv0}, training)
    pooled = seen["conv0"].mean(dim=(2, 3))
    for head, u, t, a in zip(model.aux_heads, out.aux_raw, out.temperature, out.aux):
        z = pooled @ head.fc.weight.T  # bias-free Linear(64 -> K + 1) on GAP(conv0)
        torch.testing.assert_close(u, z[:, :7])
        torch.testing.assert_close(t, torch.sigmoid(z[:, 7]))
        torch.testing.assert_close(a, u / t[:, None] if training else u)
    assert not torch.allclose(out.aux_raw[0], out.aux_raw[1])  # three projections of the same feature


@pytest.mark.parametrize("training", (True, False))
def test_resnet18_historic_heads_read_the_first_block_with_eps_scalers(training):
    k = 7
    model = make("resnet18", k, head_layout="historic")
    out, seen = _capture(model, {"block0": model.layer1[0]}, training)
    assert seen["block0"].shape == (2, 64, 32, 32)
    pooled = seen["block0"].mean(dim=(2, 3))
    for head, eps, u, t, a in zip(model.aux_heads, (0.1, 0.01, 0.001), out.aux_raw, out.temperature, out.aux):
        assert head.fc.weight.shape == (k, 64) and head.fc.bias.shape == (k,)
        assert head.scaler.weight.shape == (1, 64) and head.scaler.bias.shape == (1,)
        torch.testing.assert_close(u, pooled @ head.fc.weight.T + head.fc.bias)
        expected_t = torch.sigmoid(pooled @ head.scaler.weight.T + head.scaler.bias).squeeze(1) + eps
        torch.testing.assert_close(t, expected_t)
        torch.testing.assert_close(a, u / t[:, None] if training else u)
    assert out.final_scaled == ()  # ResNet-18's final head has no scaler
    assert model.final_scaler is None


@pytest.mark.parametrize("training", (True, False))
def test_resnet50_historic_heads_and_scaled_final_head(training):
    k = 5
    model = make("resnet50", k, head_layout="historic")
    out, seen = _capture(model, {"l1": model.layer1, "l2": model.layer2, "l3": model.layer3, "l4": model.layer4},
                         training)
    for head, key, channels, u, t, a in zip(model.aux_heads, ("l1", "l2", "l3"), (256, 512, 1024), out.aux_raw,
                                            out.temperature, out.aux):
        pooled = seen[key].mean(dim=(2, 3))
        assert pooled.shape == (2, channels)
        torch.testing.assert_close(u, pooled @ head.fc.weight.T + head.fc.bias)
        torch.testing.assert_close(t, torch.sigmoid(pooled @ head.scaler.weight.T + head.scaler.bias).squeeze(1) + 0.5)
        torch.testing.assert_close(a, u / t[:, None] if training else u)
    pooled = seen["l4"].mean(dim=(2, 3))
    torch.testing.assert_close(out.final, pooled @ model.classifier.weight.T + model.classifier.bias)
    final_t = torch.sigmoid(pooled @ model.final_scaler.weight.T + model.final_scaler.bias) + 0.5  # (B, 1)
    assert len(out.final_scaled) == 1
    torch.testing.assert_close(out.final_scaled[0], out.final / final_t if training else out.final)
    # scale_aux false: nothing is served scaled, the final head included
    plain = make("resnet50", k, head_layout="historic", scale_aux=False).train()
    with torch.no_grad():
        o = plain(images(2))
    assert torch.equal(o.final_scaled[0], o.final) and all(torch.equal(a, u) for a, u in zip(o.aux, o.aux_raw))


@pytest.mark.parametrize("name", HISTORIC)
def test_historic_body_head_split_includes_the_scalers(name):
    k = 10
    fixed, historic = make(name, k), make(name, k, head_layout="historic")
    # the body does not change with the layout
    assert [(n, p.shape) for n, p in fixed.named_part_parameters("body")] == \
           [(n, p.shape) for n, p in historic.named_part_parameters("body")]
    head_names = {n for n, _ in historic.named_part_parameters("head")}
    scaler_names = {n for n, _ in historic.named_parameters() if "scaler" in n}
    expected_scalers = {"cnn4": 0, "resnet18": 6, "resnet50": 8}[name]  # weight + bias per scaler
    assert len(scaler_names) == expected_scalers
    assert scaler_names <= head_names  # FedBABU freezes them with the heads
    assert set(historic.head_state_keys()) == head_names
    assert not any("scaler" in k_ for k_ in historic.body_state_keys())
    head_ids = {id(p) for p in historic.head_parameters()}
    assert {id(p) for n, p in historic.named_parameters() if "scaler" in n} <= head_ids
    assert head_ids.isdisjoint(id(p) for p in historic.body_parameters())
    # head pieces: the temperature is the separate scalers (whole), never a class row of fc
    temp = historic.head_piece_rows("temperature")
    if name == "cnn4":
        assert temp == {f"aux_heads.{i}.fc.weight": slice(-1, None) for i in range(3)}
    else:
        assert temp == {f"aux_heads.{i}.scaler.{w}": None for i in range(3) for w in ("weight", "bias")}
    final = historic.head_piece_rows("final_head")
    assert set(final) == {"classifier.weight", "classifier.bias"} | (
        {"final_scaler.weight", "final_scaler.bias"} if name == "resnet50" else set())


def test_historic_parameter_counts():
    k = 100
    r18 = make("resnet18", k, head_layout="historic")
    assert n_params(r18.head_parameters()) == 3 * (64 * k + k + 65) + 512 * k + k
    r50 = make("resnet50", k, head_layout="historic")
    assert n_params(r50.body_parameters()) == 23_520_842 - 20_490
    assert n_params(r50.head_parameters()) == sum(c * k + k + c + 1 for c in (256, 512, 1024)) + 2048 * k + k + 2049
    assert n_params(make("cnn4", k, head_layout="historic")) == n_params(make("cnn4", k))

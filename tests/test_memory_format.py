"""memory_format: channels_last (fl_sd.models.use_channels_last, orchestrator config): the layout really is NHWC,
the numbers are the default layout's up to reassociation, states stay exchangeable, the batched engine refuses it."""
from __future__ import annotations

import copy

import pytest
import torch

from fed_fixtures import TINY, tiny_config
from fl_sd.models import create_model, use_channels_last
from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.federation import Federation
from orchestrator.backends import make_backend
from orchestrator.fingerprint import differences

CL = torch.channels_last


@pytest.mark.parametrize("model,classes", [("cnn4", 10), ("mobilenet", 100)])
def test_weights_and_activations_are_channels_last_and_outputs_equal(model, classes):
    torch.manual_seed(0)
    net = create_model(model, num_classes=classes).eval()
    ref = copy.deepcopy(net)
    use_channels_last(net)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=CL) for c in convs)
    assert not convs[0].weight.is_contiguous()  # really converted (a 3-channel 3x3 kernel is not both)
    seen = []
    convs[-1].register_forward_hook(lambda m, args, out: seen.append((args[0].is_contiguous(memory_format=CL),
                                                                      out.is_contiguous(memory_format=CL))))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        got, want = net(x), ref(x)
    assert seen == [(True, True)]  # deep inside the network the activations are NHWC
    assert torch.allclose(got.final, want.final, rtol=1e-4, atol=1e-5)
    for a, b in zip(got.aux, want.aux):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert net.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(net.state_dict())  # an NHWC state loads into the default layout
    with torch.no_grad():
        assert torch.allclose(ref(x).final, got.final, rtol=1e-4, atol=1e-5)


def _federation(tmp_path, fmt, *overrides):
    cfg = tiny_config(tmp_path / fmt, *TINY, "--precision", "64-true", "--memory_format", fmt, *overrides)
    fed = Federation(cfg, tmp_path / fmt, log=lambda *_: None)
    engine = make_backend("inprocess", cfg, fed.run_dir, fed.runtime, fed.algorithm)
    logs = [fed.run_round(engine) for _ in range(3)]
    return fed, logs, fed.evaluate(), fed.personalize()


def _close(a: dict, b: dict, tol: float) -> bool:
    return all(float((a[k].double() - b[k].double()).abs().max()) <= tol * max(1.0, float(a[k].double().abs().max()))
               for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("algorithm", ["mhmd", "fedper"])
def test_channels_last_federation_equals_contiguous_float64(tmp_path, algorithm):
    a = _federation(tmp_path, "contiguous", "--algorithm.name", algorithm)
    b = _federation(tmp_path, "channels_last", "--algorithm.name", algorithm)
    conv = next(m for m in b[0].runtime.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=CL)  # still NHWC after loading states every round
    assert _close(a[0].server.global_state, b[0].server.global_state, 1e-10)
    assert a[0].server.store.keys() == b[0].server.store.keys()
    for c in a[0].server.store:
        assert _close(a[0].server.store[c], b[0].server.store[c], 1e-10)
    for key, value in a[2].items():
        if isinstance(value, float):
            assert b[2][key] == pytest.approx(value, rel=1e-10, abs=1e-10), key
    flat = [[v for row in run[3]["per_client"] for v in row] for run in (a, b)]
    assert flat[1] == pytest.approx(flat[0], rel=1e-10, abs=1e-10)


def test_memory_format_is_not_part_of_the_run_and_the_batched_engine_refuses_channels_last(tmp_path):
    assert differences({"memory_format": "contiguous"}, {"memory_format": "channels_last"}) == []
    with pytest.raises(ConfigError, match=r"memory_format: channels_last cannot be kept under the batched engine"):
        load_config("configs/smoke.yaml", ["--backend", "batched", "--memory_format", "channels_last",
                                           "--run_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="memory_format"):
        load_config("configs/smoke.yaml", ["--memory_format", "nhwc", "--run_dir", str(tmp_path)])

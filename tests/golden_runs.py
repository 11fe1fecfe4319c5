"""Golden runs: the numbers every refactoring must keep (recorded before a numerics-bearing change, compared after).

``python tests/golden_runs.py`` (from the repository root, one thread) records ``tests/golden/<case>.json`` from the
current code; ``tests/test_golden.py`` re-runs every case and compares. A case is configs/smoke.yaml (or another
config) with a few overrides; what is compared: ``results.json`` without wall-clock times, the per-round training
metrics, and SHA-256 digests of the final global model and of every client's kept state.

Recorded at commit 040d96f (before the client/server redesign). One deliberate change since: Ditto's
``train_personal_loss`` is the float64 mean of the step losses like every other metric (it was a float32 mean), so
that one field of ``smoke-ditto.json`` was re-recorded; every model, result and other metric is bitwise the original.
Second: the evaluation of a model whose BatchNorm has no running statistics runs each client's test split as one
plain call of the network (the reference's one call per client) instead of a ``vmap`` over several clients, which
reassociates BatchNorm's float32 sums: the global-model ``loss_*`` of ``smoke-fedavg``, ``smoke-fedbabu`` and
``smoke-fedper`` moved by at most 5.8e-8 (absolute) and were re-recorded; accuracies, temperatures, models and every
other field are bitwise the previous recording.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
SHARED_DATA = REPO.parent / "shared" / "data"

ALGORITHMS = ["fedavg", "fedbabu", "fedper", "mhmd", "mhmd_no_scaler", "mhmd_ungated", "mhmd_coarse_gated",
              "mhmd_one_way", "mhmd_ce", "fedrep", "perfedavg", "ditto", "lg_fedavg"]

#: case name -> (base config, overrides)
CASES: dict[str, tuple[str, list[str]]] = {
    **{f"smoke-{a}": ("configs/smoke.yaml", ["--algorithm.name", a]) for a in ALGORITHMS},
    "smoke-mhmd-dirichlet": ("configs/smoke.yaml", ["--data.partition", "dirichlet", "--data.alpha", "0.5"]),
    # real CIFAR-10 images (a narrow cnn4 keeps it to seconds)
    "cifar10_mini-mhmd": ("configs/cifar10_mini.yaml", [
        "--data.path", str(SHARED_DATA / "cifar10_mini.npz"), "--model.options", "{width: 16}",
        "--federation.rounds", "4", "--federation.eval_every", "2", "--personalization.epochs", "2"]),
}

#: Results fields that are wall-clock times, not training outcomes.
TIMING_KEYS = {"seconds"}


def strip_timing(obj):
    """``obj`` without its wall-clock fields (``TIMING_KEYS``), at every depth."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted (key, dtype, shape, bytes) of a flat state dict."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def flat_client_state(parts) -> dict[str, torch.Tensor]:
    """A client's kept state as one flat dict (whatever the store's nesting: {part: {key: t}} or {key: t})."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in parts.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def outcome(run_dir: Path, results: dict) -> dict:
    saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]
    return {
        "results": strip_timing(json.loads(json.dumps(results))),
        "round_log": strip_timing(saved["round_log"]),
        "global_state": digest(saved["global_state"]),
        "client_state": {str(c): digest(flat_client_state(p)) for c, p in sorted(saved["client_state"].items())},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
    }


def run_case(name: str, tmp: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from fed_fixtures import tiny_config
    from orchestrator.runner import run

    base, overrides = CASES[name]
    run_dir = tmp / name
    results = run(tiny_config(run_dir, *overrides, base=base))
    return outcome(run_dir, results)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): oneDNN/MKL pick kernels by vendor and micro-architecture, not only by
    instruction set, so bitwise equality is only expected on the same CPU model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def main() -> None:
    import tempfile

    torch.set_num_threads(1)
    GOLDEN_DIR.mkdir(exist_ok=True)
    names = sys.argv[1:] or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            out = run_case(name, Path(tmp))
            (GOLDEN_DIR / f"{name}.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
            print(f"recorded {name}: best {out['results']['best_acc_final']:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()

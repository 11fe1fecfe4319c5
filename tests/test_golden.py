"""Golden runs (tests/golden_runs.py): every algorithm on configs/smoke.yaml, a Dirichlet split and a run on real
CIFAR-10 images give exactly the numbers recorded before the orchestrator's redesign.

Bitwise on a CPU of the recording's model and instruction set (float results of oneDNN/MKL kernels depend on both);
elsewhere the final model's accuracies must agree within a tolerance (best-round selection and personalisation
may differ by a last-ulp flip) and the digests are not compared.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import golden_runs

CASES = sorted(golden_runs.CASES)
#: Results that a last-ulp difference can flip on another CPU: the argmax over rounds (best round) and single clients'
#: accuracies (one test image of a tiny split is 5 points); compared bitwise on the recording CPU only.
CPU_DEPENDENT = {"per_client", "best_round", "start_round", "round"}


def _close(a, b, path="") -> list[str]:
    """Differences between two JSON values beyond a small tolerance (for another CPU instruction set)."""
    if path.rsplit(".", 1)[-1] in CPU_DEPENDENT:
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if a.keys() != b.keys() else []
        return out + [d for k in a.keys() & b.keys() for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if math.isclose(a, b, rel_tol=0.05, abs_tol=5.0) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.parametrize("case", CASES)
def test_golden_run(tmp_path, case):
    path = golden_runs.GOLDEN_DIR / f"{case}.json"
    want = json.loads(path.read_text())
    if case.startswith("cifar10_mini") and not (golden_runs.SHARED_DATA / "cifar10_mini.npz").exists():
        pytest.skip("needs ../shared/data/cifar10_mini.npz")
    got = json.loads(json.dumps(golden_runs.run_case(case, tmp_path)))
    # Training metrics an algorithm did not report when the golden was recorded may be new; recorded ones must stay.
    got["round_log"] = [{k: r[k] for k in w if k in r} | {k: r.get(k) for k in w if k not in r}
                        for r, w in zip(got["round_log"], want["round_log"])] + got["round_log"][len(want["round_log"]):]
    same_cpu = (want["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
                and want.get("cpu_model") == golden_runs.cpu_model())
    if same_cpu:
        for key in ("results", "round_log", "global_state", "client_state"):
            assert got[key] == want[key], f"{case}: {key} differs from the golden run (bitwise)"
    else:
        # the best round is an argmax over evaluations, and personalisation starts from it: compare the final model
        final = ("global_final", "rounds", "algorithm", "seed")
        got_final = {k: got["results"][k] for k in final}
        want_final = {k: want["results"][k] for k in final}
        assert not _close(got_final, want_final), _close(got_final, want_final)[:5]

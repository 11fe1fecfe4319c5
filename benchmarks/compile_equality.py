"""The compiled batched engine (``batched.compile``, inductor) against the eager engines, on one machine: a small
federation (configs/smoke.yaml, 4 synthetic clients, cnn4 width 8, 3 rounds, evaluation, 1 personalisation epoch) run
in process, batched, and batched + compiled; prints the largest relative difference of the global state, the clients'
kept states, the evaluation and the personalised accuracies to the in-process run, and the wall time (compilation
included). The CPU test suite checks the compiled step with the aot_eager backend (no code generation); this checks
inductor's generated code, which takes minutes to compile on a CPU.

    OMP_NUM_THREADS=1 python benchmarks/compile_equality.py            # float32
    OMP_NUM_THREADS=1 python benchmarks/compile_equality.py --precision 64-true
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.backends import make_backend  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.federation import Federation  # noqa: E402

SMALL = ["--data.num_clients", "4", "--data.synthetic",
         "{num_classes: 4, train_per_class: 20, test_per_class: 5, image_size: 16}", "--model.options", "{width: 8}",
         "--federation.batch_size", "10", "--federation.client_fraction", "0.5", "--federation.eval_every", "1",
         "--personalization.epochs", "1", "--tracking.progress", "false", "--tracking.wandb", "disabled",
         "--tracking.plots", "false"]


def federation(tmp: str, backend: str, compile_mode: str, precision: str, algorithm: str):
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--run_dir", tmp, *SMALL, "--backend", backend,
                                                        "--batched.compile", compile_mode, "--precision", precision,
                                                        "--algorithm.name", algorithm])
    t0 = time.perf_counter()
    fed = Federation(cfg, tmp, log=lambda *_: None)
    engine = make_backend(backend, cfg, fed.run_dir, fed.runtime, fed.algorithm)
    try:
        for _ in range(3):
            fed.run_round(engine)
    finally:
        engine.close()
    evaluation = fed.evaluate()
    personalized = [v for row in fed.personalize()["per_client"] for v in row]
    return fed, evaluation, personalized, time.perf_counter() - t0


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "64-true"])
    parser.add_argument("--algorithm", default="mhmd")
    args = parser.parse_args()
    runs = {}
    for label, backend, mode in (("inprocess", "inprocess", "off"), ("batched", "batched", "off"),
                                 ("batched + compile default", "batched", "default")):
        with tempfile.TemporaryDirectory() as tmp:
            runs[label] = federation(tmp, backend, mode, args.precision, args.algorithm)
    ref_fed, ref_eval, ref_pers, _ = runs["inprocess"]
    print(f"\n{args.algorithm}, precision {args.precision}: largest relative difference to the in-process run\n")
    print("| engine | wall s | global state | kept client states | evaluation | personalised acc |")
    print("|---|---|---|---|---|---|")
    for label, (fed, evaluation, pers, wall) in runs.items():
        g = max(rel(ref_fed.server.global_state[k], v) for k, v in fed.server.global_state.items())
        kept = max((rel(ref_fed.server.store[c][k], v) for c, s in fed.server.store.items() for k, v in s.items()),
                   default=0.0)
        ev = max((abs(evaluation[k] - v) / max(abs(v), 1e-12) for k, v in ref_eval.items()
                  if isinstance(v, float) and math.isfinite(v) and "second" not in k), default=0.0)
        pa = max((abs(a - b) / max(abs(b), 1e-12) for a, b in zip(pers, ref_pers)), default=0.0)
        print(f"| {label} | {wall:.1f} | {g:.1e} | {kept:.1e} | {ev:.1e} | {pa:.1e} |")


if __name__ == "__main__":
    main()

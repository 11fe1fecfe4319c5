"""The paper's main run end to end (configs/cifar100.yaml: MobileNet, 100 clients, 10 per round, 320 rounds,
evaluation every 8, all 100 clients fine-tuned for 5 epochs) on synthetic CIFAR-100-shaped data (50,000 train /
10,000 test images, so no download), with one engine; prints wall time, seconds per round, personalisation seconds
and peak GPU memory. benchmarks/gpu_paper_run.sh runs it with every engine.

    python benchmarks/paper_run.py --backend batched
    python benchmarks/paper_run.py --backend inprocess --rounds 16      # a shorter run (same per-round cost)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.runner import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="batched", choices=["inprocess", "batched"])
    parser.add_argument("--rounds", type=int, default=320)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                        help="batched.compile (backend batched only); the wall time includes compiling")
    parser.add_argument("--memory-format", default="contiguous", choices=["contiguous", "channels_last"],
                        help="memory_format (channels_last: backend inprocess only)")
    parser.add_argument("--finetune-epochs", type=int, default=5, help="personalisation epochs (the paper: 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "cifar100.yaml", [
            "--run_dir", tmp, "--device", args.device, "--backend", args.backend, "--precision", args.precision,
            "--batched.compile", args.compile, "--memory_format", args.memory_format,
            "--data.dataset", "synthetic",
            "--data.synthetic", "{num_classes: 100, train_per_class: 500, test_per_class: 100}",
            "--federation.rounds", str(args.rounds), "--personalization.epochs", str(args.finetune_epochs), "--tracking.progress", "false", "--tracking.wandb", "disabled",
            "--tracking.plots", "false"])
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        results = run(cfg)
        wall = time.perf_counter() - t0
        rounds_csv = (Path(tmp) / "rounds.csv").read_text().splitlines()
        header = rounds_csv[0].split(",")
        col = header.index("seconds")
        per_round = sorted(float(line.split(",")[col]) for line in rounds_csv[1:])
        pers = (results.get("personalized") or {}).get("seconds")
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print("| engine | compile | precision | memory format | rounds | wall s | median s/round | personalisation s | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.backend} | {args.compile} | {args.precision} | {args.memory_format} | {args.rounds} | {wall:.1f} | {per_round[len(per_round) // 2]:.4f} | "
          f"{pers if pers is None else round(pers, 2)} | {peak:.2f} |")


if __name__ == "__main__":
    main()

"""Start-up: seconds from ``fl-sd ...`` to its answer -- ``--help``, a misspelt key (command line, config file), a bad
value, and the first finished round of configs/smoke.yaml -- the median of a few fresh processes each.

    python benchmarks/startup.py                     # this checkout, 3 processes per row
    python benchmarks/startup.py --repo /tmp/old --repeat 5     # another checkout (e.g. a git worktree), to compare

A misspelt key is checked from orchestrator.schema alone (no torch); a bad value needs the full config (the algorithm
registry, torch); the first round needs the training stack and the data.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cases(tmp: Path) -> list[tuple[str, list[str]]]:
    typo = tmp / "typo.yaml"
    typo.write_text("federation:\n  roundz: 3\n")
    smoke = ["--config", "configs/smoke.yaml"]
    return [("--help", ["--help"]),
            ("typo on the command line", smoke + ["--federation.roundz", "3"]),
            ("typo in the config file", ["--config", str(typo)]),
            ("bad value (federation.rounds 0)", smoke + ["--federation.rounds", "0"]),
            ("first round done (smoke)", smoke + ["--tracking.progress", "false", "--tracking.plots", "false"])]


def time_once(repo: Path, argv: list[str], tmp: Path, first_round: bool) -> float:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    run_dir = Path(tempfile.mkdtemp(dir=tmp)) / "run"
    extra = ["--run_dir", str(run_dir)] if first_round else []
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(repo / "orchestrator" / "main.py"), *argv, *extra], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not first_round:
        proc.wait()
        return time.perf_counter() - start
    rounds = run_dir / "rounds.csv"
    while proc.poll() is None:
        if rounds.exists() and len(rounds.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    proc.kill()
    proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose orchestrator/main.py is timed")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        print(f"start-up of {args.repo} (median of {args.repeat} processes; OMP_NUM_THREADS=1)\n")
        print("| case | median s | min s | max s |")
        print("|---|---:|---:|---:|")
        for label, argv in _cases(tmp_path):
            times = [time_once(args.repo, argv, tmp_path, label.startswith("first round")) for _ in range(args.repeat)]
            print(f"| {label} | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()

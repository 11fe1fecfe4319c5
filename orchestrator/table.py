"""Print the paper-style table from finished run directories.

    python -m orchestrator.table runs/paper-*            # rows (s, f, tau), columns algorithms, cells mean ± std
    python -m orchestrator.table runs/* --metric global  # global (epoch-0) accuracy instead of personalised

Several seeds of one cell are pooled: the cell shows the mean over runs of the per-run mean ± std over clients, and
the number of runs when more than one.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import yaml


def collect(run_dirs: list[Path], metric: str = "personalized") -> dict[tuple, dict[str, list[tuple[float, float]]]]:
    cells: dict[tuple, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for run_dir in run_dirs:
        cfg_path, res_path = run_dir / "config.yaml", run_dir / "results.json"
        if not (cfg_path.exists() and res_path.exists()):
            continue
        cfg = yaml.safe_load(cfg_path.read_text())
        res = json.loads(res_path.read_text())
        pers = res.get("personalized")
        if metric == "personalized" and pers:
            value = (pers["acc_mean"][-1], pers["acc_std"][-1])
        elif metric == "global" and res.get("global_best"):
            value = (res["global_best"]["acc_final"], res["global_best"]["acc_final_std"])
        else:
            continue
        d, f = cfg["data"], cfg["federation"]
        split = d["shards_per_client"] if d["partition"] == "shards" else d["partition"]
        key = (split, f["client_fraction"], f["local_epochs"])
        cells[key][cfg["algorithm"]["name"]].append(value)
    return cells


def markdown(cells, order: list[str] | None = None) -> str:
    algorithms = sorted({a for row in cells.values() for a in row})
    if order:
        algorithms = [a for a in order if a in algorithms] + [a for a in algorithms if a not in order]
    lines = ["| s | f | τ | " + " | ".join(algorithms) + " |", "|---|---|---|" + "---|" * len(algorithms)]

    def sort_key(key):
        s, f, tau = key
        return (-s if isinstance(s, (int, float)) else 0, -f, tau)

    for key in sorted(cells, key=sort_key):
        row = []
        for alg in algorithms:
            vals = cells[key].get(alg, [])
            if not vals:
                row.append("")
                continue
            mean = sum(v[0] for v in vals) / len(vals)
            std = sum(v[1] for v in vals) / len(vals)
            row.append(f"{mean:.2f}±{std:.2f}" + (f" (n={len(vals)})" if len(vals) > 1 else ""))
        s, f, tau = key
        lines.append(f"| {s} | {f:g} | {tau} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--metric", choices=("personalized", "global"), default="personalized")
    args = parser.parse_args(argv)
    cells = collect(args.run_dirs, args.metric)
    if not cells:
        print("error: no finished runs (config.yaml + results.json) among the given directories", file=sys.stderr)
        return 2
    print(markdown(cells, order=["mhmd", "fedbabu", "fedavg", "fedper", "lg_fedavg", "fedrep", "perfedavg", "ditto"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

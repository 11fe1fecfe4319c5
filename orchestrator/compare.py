"""Compare algorithms over seeds: run directories -> a table with 95 % intervals and paired differences, and figures.

    fl-sd-compare runs/my-sweep --baseline mhmd            # or: python -m orchestrator.compare RUN_DIR... [options]

Every run directory below the given paths (a directory holding ``results.json``) counts once. Runs are grouped by
cell and algorithm: a sweep's runs by its ``sweep_run.json`` (cell, algorithm label, seed); other runs by their config
(dataset, partition, clients, f, tau, rounds, model) and ``algorithm.name``. Only one experiment's seeds are pooled:
runs of a cell and algorithm whose configs differ in more than the seed (and the keys that do not change a run,
``fingerprint.NOT_EXPERIMENT``) are listed apart, ``name [key=value]``, with a note naming what differs. For every
cell and algorithm the table gives the personalised accuracy after the last fine-tuning epoch (the mean over clients
of one run) as the mean over seeds ± the half-width of its t-interval, the same before fine-tuning (epoch 0), and the paired difference to the
baseline over the seeds both ran (same seed = same partition and initial model) with its interval; ``*`` marks an
interval that excludes 0. Written to ``--out`` (default ``<first path>/comparison``): ``comparison.md``,
``comparison.csv`` and, per cell, ``<cell>_finetune.png`` (accuracy vs fine-tuning epoch with interval bands, the
paper's fine-tuning-speed figure), ``<cell>_heads.png`` (accuracy of every head of the global model vs round) and
``<cell>_clients.png`` (per-client personalised accuracy, all seeds pooled).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .errors import RunDirError
from .plots import accuracy_band, integer_ticks
from .fingerprint import distinguishing, group_experiments, label
from .rundir import EVALUATIONS_FILE, RESULTS_FILE, read_finished_run
from .stats import Interval, mean_interval, paired_difference
from .sweep import SWEEP_RUN_FILE

CSV_FIELDS = ("cell", "algorithm", "seeds", "acc", "acc_ci", "acc_epoch0", "acc_epoch0_ci", "diff", "diff_ci",
              "diff_seeds", "diff_excludes_zero")


@dataclass(frozen=True)
class RunRecord:
    cell: str
    algorithm: str
    seed: int
    run_dir: Path
    results: dict[str, Any]

    def personalized(self, epoch: int = -1) -> float:
        return float(self.results["personalized"]["acc_mean"][epoch])


def cell_of(config: dict[str, Any]) -> str:
    """A cell's name from a run's config (runs outside a sweep)."""
    d, f, m = config["data"], config["federation"], config["model"]
    split = {"shards": f"s{d.get('shards_per_client')}", "dirichlet": f"dir{d.get('alpha')}"}.get(d["partition"],
                                                                                                  d["partition"])
    return (f"{d['dataset']}_{split}_N{d['num_clients']}_f{f['client_fraction']:g}_tau{f['local_epochs']}"
            f"_R{f['rounds']}_{m['name']}")


def find_runs(paths: list[Path], notes: list[str] | None = None) -> list[RunRecord]:
    """Every finished run (``results.json`` with personalisation) in or below ``paths``. Runs of one cell and
    algorithm that are not one experiment (their configs differ in more than the seed and
    ``fingerprint.NOT_EXPERIMENT``) are not pooled: each experiment's algorithm gets a ``[key=value]`` suffix naming
    the keys that differ, and a line saying so is appended to ``notes``."""
    dirs = result_dirs(paths)
    candidates: dict[tuple[str, str], list[tuple[dict, tuple]]] = defaultdict(list)
    for run_dir in dirs:
        found_run = read_finished_run(run_dir, REQUIRED)
        if found_run is None or not found_run[1].get("personalized"):
            continue
        config, results = found_run
        meta_path = run_dir / SWEEP_RUN_FILE
        try:
            if meta_path.exists():
                meta = json.loads(meta_path.read_text())
                cell, algorithm, seed = meta["cell"], meta["algorithm"], int(meta["seed"])
            else:
                cell, algorithm, seed = cell_of(config), config["algorithm"]["name"], int(config["seed"])
        except (ValueError, KeyError, TypeError) as err:
            raise RunDirError(f"{run_dir}: damaged {SWEEP_RUN_FILE} or config ({type(err).__name__}: {err}); leave "
                              "the directory out") from None
        candidates[(cell, algorithm)].append((config, (seed, run_dir, results)))
    records, seen = [], {}
    for (cell, name), entries in candidates.items():
        groups = group_experiments(entries)
        keys = distinguishing([config for config, _ in entries]) if len(groups) > 1 else []
        labelled = []
        for group in groups:
            config = next(c for c, item in entries if item is group[0])
            algorithm = f"{name} [{label(config, keys)}]" if keys else name
            labelled.append(f"{algorithm}: {', '.join(str(item[1]) for item in group)}")
            records += _records(cell, algorithm, group, seen)
        if keys and notes is not None:
            notes.append(f"cell {cell}, {name}: {len(groups)} different experiments, not pooled ({'; '.join(labelled)})")
    return records


def _records(cell: str, algorithm: str, group: list[tuple], seen: dict) -> list[RunRecord]:
    records = []
    for seed, run_dir, results in group:
        key = (cell, algorithm, seed)
        if key in seen:
            raise RunDirError(f"{run_dir} and {seen[key]} are both {algorithm}, seed {seed} of cell {cell}; "
                              "pass only one of them")
        seen[key] = run_dir
        records.append(RunRecord(cell, algorithm, seed, run_dir, results))
    return records


#: The config keys a comparison reads (a config.yaml without one is refused, naming it)
REQUIRED = ("seed", "data.dataset", "data.partition", "data.num_clients", "federation.client_fraction",
            "federation.local_epochs", "federation.rounds", "model.name", "algorithm.name")


def result_dirs(paths: list[Path]) -> list[Path]:
    """The run directories (holding a ``results.json``) that are, or lie below, ``paths``: each once, in the order
    of ``paths`` and sorted below each; a path that does not exist is an error."""
    dirs: list[Path] = []
    for path in paths:
        if not path.exists():
            raise RunDirError(f"{path}: no such file or directory")
        found = [path] if (path / RESULTS_FILE).exists() else sorted(p.parent for p in path.rglob(RESULTS_FILE))
        dirs += [d for d in found if d not in dirs]
    return dirs


def _grouped(records: list[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    cells: dict[str, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for rec in sorted(records, key=lambda r: r.seed):
        cells[rec.cell][rec.algorithm].append(rec)
    return cells


def table(records: list[RunRecord], baseline: str | None = None, confidence: float = 0.95,
          order: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (cell, algorithm): interval of the personalised accuracy, and the paired difference to
    ``baseline`` (None for the baseline itself, or without one)."""
    rows = []
    for cell, algorithms in sorted(_grouped(records).items()):
        names = sorted(algorithms, key=lambda a: ((order or []).index(a) if a in (order or []) else len(order or []),
                                                  a != baseline, a))
        base = {r.seed: r.personalized() for r in algorithms.get(baseline, [])} if baseline else {}
        for name in names:
            runs = algorithms[name]
            final = {r.seed: r.personalized() for r in runs}
            diff = paired_difference(final, base, confidence) if base and name != baseline else None
            rows.append({"cell": cell, "algorithm": name, "seeds": sorted(final),
                         "acc": mean_interval(final.values(), confidence),
                         "acc_epoch0": mean_interval([r.personalized(0) for r in runs], confidence),
                         "diff": diff})
    return rows


def _num(value: float) -> str:
    return "" if value != value else f"{value:.4f}"  # NaN -> empty


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_FIELDS)
        for row in rows:
            d: Interval | None = row["diff"]
            writer.writerow([row["cell"], row["algorithm"], " ".join(map(str, row["seeds"])), _num(row["acc"].mean),
                             _num(row["acc"].half_width), _num(row["acc_epoch0"].mean),
                             _num(row["acc_epoch0"].half_width), "" if d is None else _num(d.mean),
                             "" if d is None else _num(d.half_width), "" if d is None else d.n,
                             "" if d is None else d.excludes_zero()])


def markdown(rows: list[dict[str, Any]], baseline: str | None, confidence: float = 0.95) -> str:
    pct = f"{100 * confidence:g} %"
    head = (f"| cell | algorithm | seeds | personalised acc (mean ± {pct} CI) | before fine-tuning | "
            f"paired diff to {baseline or '-'} (± {pct} CI) |")
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        d: Interval | None = row["diff"]
        diff = "—" if d is None else f"{d.mean:+.2f} ± {d.half_width:.2f}{' *' if d.excludes_zero() else ''}" \
            + ("" if d.n == len(row["seeds"]) else f" (n={d.n})")
        lines.append(f"| {row['cell']} | {row['algorithm']} | {len(row['seeds'])} | {row['acc'].format()} | "
                     f"{row['acc_epoch0'].format()} | {diff} |")
    return "\n".join(lines)


def _band(ax, x, values_per_seed: list[list[float]], label: str, confidence: float) -> None:
    columns = list(zip(*values_per_seed))
    ivs = [mean_interval(c, confidence) for c in columns]
    mean = [iv.mean for iv in ivs]
    ax.plot(x, mean, marker="o", markersize=3, label=f"{label} (n={len(values_per_seed)})")
    if len(values_per_seed) > 1:
        low, high = accuracy_band(mean, [iv.half_width for iv in ivs])
        ax.fill_between(x, low, high, alpha=0.2)


def _read_evaluations(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / EVALUATIONS_FILE
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def figures(records: list[RunRecord], out: Path, confidence: float = 0.95) -> list[Path]:
    written = []
    for cell, algorithms in sorted(_grouped(records).items()):
        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.subplots()
        for name, runs in algorithms.items():
            curves = [r.results["personalized"]["acc_mean"] for r in runs]
            length = min(len(c) for c in curves)
            _band(ax, list(range(length)), [c[:length] for c in curves], name, confidence)
        ax.set(xlabel="fine-tuning epoch", ylabel="personalised accuracy (%)",
               title=f"{cell}: fine-tuning speed (mean over seeds, {100 * confidence:g} % band)")
        integer_ticks(ax)
        ax.legend()
        written.append(_save(fig, out / f"{cell}_finetune.png"))

        fig = Figure(figsize=(4.2 * len(algorithms), 3.8))
        axes = fig.subplots(1, len(algorithms), sharey=True, squeeze=False)[0]
        for ax, (name, runs) in zip(axes, algorithms.items()):
            evals = [e for e in (_read_evaluations(r.run_dir) for r in runs) if e]
            if evals:
                length = min(len(e) for e in evals)
                rounds = [int(row["round"]) for row in evals[0][:length]]
                heads = [k[4:] for k in evals[0][0] if k.startswith("acc_") and not k.endswith(("_std", "_weighted"))]
                for h in heads:
                    _band(ax, rounds, [[float(row[f"acc_{h}"]) for row in e[:length]] for e in evals], h, confidence)
                ax.legend(fontsize=7)
            ax.set(xlabel="round", title=name)
            integer_ticks(ax)
        axes[0].set_ylabel("global model test accuracy (%)")
        written.append(_save(fig, out / f"{cell}_heads.png"))

        fig = Figure(figsize=(6.5, 4.2))
        ax = fig.subplots()
        names = list(algorithms)
        pooled = [[row[-1] for r in algorithms[n] for row in r.results["personalized"]["per_client"]] for n in names]
        ax.boxplot(pooled)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.set(ylabel="per-client personalised accuracy (%)", ylim=(0, 100),
               title=f"{cell}: clients of all seeds after fine-tuning")
        written.append(_save(fig, out / f"{cell}_clients.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def compare(paths: list[Path], baseline: str | None = None, out: Path | None = None, confidence: float = 0.95,
            plots: bool = True) -> tuple[str, list[Path]]:
    """Write comparison.md / comparison.csv (and figures) to ``out``; return the Markdown table and written files."""
    notes: list[str] = []
    records = find_runs(paths, notes)
    if not records:
        finished = result_dirs(paths)
        raise RunDirError(f"no fine-tuned runs (results.json with personalisation) in {' '.join(map(str, paths))}"
                          + (f": the {len(finished)} finished runs there ran without personalisation "
                             "(personalization.enabled: false); fl-sd-compare compares personalised accuracy, "
                             "python -m orchestrator.table --metric global reports their best evaluation"
                             if finished else ""))
    known = {r.algorithm for r in records}
    if baseline is not None and baseline not in known:
        raise RunDirError(f"baseline {baseline!r} has no runs here; choose one of {sorted(known)}")
    out = out or paths[0] / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    rows = table(records, baseline, confidence)
    text = markdown(rows, baseline, confidence)
    if notes:
        text += "\n\nNot pooled (runs that differ in more than the seed):\n" + "\n".join(f"- {n}" for n in notes)
    (out / "comparison.md").write_text(text + "\n")
    write_csv(rows, out / "comparison.csv")
    written = [out / "comparison.md", out / "comparison.csv"]
    if plots:
        written += figures(records, out, confidence)
    return text, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-sd-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="run directories, or directories above them (a sweep)")
    parser.add_argument("--baseline", default=None, help="algorithm (label) the paired differences are taken to")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <first path>/comparison)")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        print(f"error: --confidence must be in (0, 1), got {args.confidence}", file=sys.stderr)
        return 2
    try:
        text, written = compare(args.paths, args.baseline, args.out, args.confidence, not args.no_plots)
    except RunDirError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(text)
    print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()

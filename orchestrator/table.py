"""The paper's tables from finished run directories, with the published values beside fl-sd's.

    python -m orchestrator.table runs/paper-*                 # Tables A, B and the ablation table, where runs exist
    python -m orchestrator.table runs/* --table A --metric global

Table A: rows (s, f, tau), one column per algorithm. Which number a column reports follows its protocol
(``--metric auto``, the default): a run that was fine-tuned reports its personalised accuracy after 5 epochs (the
paper: MHMD, FedBABU, FedAvg), a run without fine-tuning its best evaluation over the rounds (the other five columns,
their scripts' own number); a footnote per column says which. Table B: accuracy after 0, 1, 2, 3, 4, 5, 10, 15, 20
fine-tuning epochs (runs with f = 0.1, tau = 10, fine-tuned for 20 epochs: configs/paper/table_b). The ablation table:
the MHMD loss ablations (``mhmd_*``) beside MHMD. Each cell is ``fl-sd (paper)``: mean ± std over clients; several
seeds of one cell are pooled (the mean over runs of the per-run mean and std, ``n=`` runs). Only runs of one
experiment are pooled: runs whose resolved configs differ in anything but the seed and the keys that do not change
what a run computes (``orchestrator.fingerprint.NOT_EXPERIMENT``: name, run_dir, tracking, device ...) are shown side
by side (``{a} / {b}``, a Table B row each), with a note under the table naming the keys that differ.

Other backbones (no published values exist; fl-sd's only): Table 16 = runs of ``resnet18`` / ``resnet50``
(configs/paper/table16), Tables 12/13 = runs of ``cnn4`` on CIFAR-10 (configs/paper/table12_13); each shows per model
the best evaluation over the rounds (Table 12: federated training) and the accuracy after 5 fine-tuning epochs
(Table 13). Those runs are kept out of Tables A, B and the ablation table.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .errors import RunDirError
from .fingerprint import distinguishing, group_experiments, label
from .rundir import read_finished_run

#: Table A's column order and the paper's names
COLUMNS = {"mhmd": "MHMD", "fedbabu": "FedBABU", "fedavg": "FedAvg", "fedper": "FedPer", "lg_fedavg": "LG-FedAvg",
           "fedrep": "FedRep", "perfedavg": "Per-FedAvg", "ditto": "Ditto"}
TABLE_B_EPOCHS = (0, 1, 2, 3, 4, 5, 10, 15, 20)
TABLE_A_EPOCH = 5
DEFAULT_PAPER = Path(__file__).resolve().parents[1].parent / "shared" / "method" / "PAPER_RESULTS.md"

Value = tuple[float, float]
T = TypeVar("T")


@dataclass
class Run:
    algorithm: str
    split: object  # shards per client, or the partition name
    fraction: float
    tau: int
    curve: list[Value] | None  # personalised accuracy after each fine-tuning epoch 0..E
    best: Value | None  # best evaluation over the rounds (acc_final mean, std)
    model: str = ""  # model.name
    dataset: str = ""  # data.dataset
    config: dict = field(default_factory=dict)  # the resolved config (config.yaml)
    run_dir: Path | None = None


#: The config keys a table reads (a config.yaml without one is refused, naming it)
REQUIRED = ("data.partition", "data.shards_per_client", "algorithm.name", "federation.client_fraction",
            "federation.local_epochs")

#: Table 16's backbones and their names
BACKBONES = {"resnet18": "ResNet-18", "resnet50": "ResNet-50"}


def paper_table(run: Run) -> str:
    """Which of the tool's table families a run belongs to: ``16`` (ResNets), ``12_13`` (cnn4 on CIFAR-10) or ``main``
    (Tables A, B and the ablation table: everything else)."""
    if run.model in BACKBONES:
        return "16"
    if run.model == "cnn4" and run.dataset == "cifar10":
        return "12_13"
    return "main"


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """The finished runs among ``run_dirs`` (directories without results.json are skipped); a damaged results.json or
    config.yaml is a RunDirError naming the file."""
    runs = []
    for run_dir in run_dirs:
        found = read_finished_run(run_dir, REQUIRED)
        if found is None:
            continue
        cfg, res = found
        pers, best = res.get("personalized"), res.get("global_best")
        d, f = cfg["data"], cfg["federation"]
        try:
            runs.append(Run(cfg["algorithm"]["name"], d["shards_per_client"] if d["partition"] == "shards" else
                            d["partition"], float(f["client_fraction"]), int(f["local_epochs"]),
                            list(zip(pers["acc_mean"], pers["acc_std"])) if pers else None,
                            (best["acc_final"], best["acc_final_std"]) if best else None,
                            (cfg.get("model") or {}).get("name", ""), d.get("dataset", ""), cfg, run_dir))
        except (KeyError, TypeError, ValueError) as err:
            raise RunDirError(f"{run_dir}: results.json or config.yaml lacks or mangles {err}; it was not written by "
                              "a finished fl-sd run: leave the directory out") from None
    return runs


def table_a_value(run: Run, metric: str) -> tuple[Value | None, str]:
    """(value, which metric) of a Table A cell: auto = personalised after 5 epochs if fine-tuned, else the best
    evaluation."""
    if metric in ("auto", "personalized") and run.curve:
        epoch = min(TABLE_A_EPOCH, len(run.curve) - 1)
        return run.curve[epoch], f"personalised accuracy after {epoch} fine-tuning epochs (best-on-test model)"
    if metric in ("auto", "global") and run.best:
        return run.best, "best evaluation over the rounds, no fine-tuning (the protocol's own number)"
    return None, ""


def pool(values: list[Value]) -> str:
    mean = sum(v[0] for v in values) / len(values)
    std = sum(v[1] for v in values) / len(values)
    return f"{mean:.2f}±{std:.2f}" + (f" (n={len(values)})" if len(values) > 1 else "")


def paper_values(path: Path | None) -> dict:
    """{"A": {(s, f, tau, algorithm): "mean±std"}, "B": {(s, algorithm, epoch): "mean±std"}} from PAPER_RESULTS.md."""
    out: dict = {"A": {}, "B": {}}
    if path is None or not path.is_file():
        return out
    names = {v: k for k, v in COLUMNS.items()}
    section = None
    for line in path.read_text().splitlines():
        if line.startswith("## Table A"):
            section = "A"
        elif line.startswith("## Table B"):
            section = "B"
        elif line.startswith("## "):
            section = None
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if section is None or not re.fullmatch(r"\d+", cells[0] if cells else ""):
            continue
        if section == "A":
            s, f, tau = int(cells[0]), float(cells[1]), int(cells[2])
            for alg, value in zip(COLUMNS, cells[3:]):
                out["A"][(s, f, tau, alg)] = value
        elif cells[1] in names:
            for epoch, value in zip(TABLE_B_EPOCHS, cells[2:]):
                out["B"][(int(cells[0]), names[cells[1]], epoch)] = value
    return out


def experiments(entries: list[tuple[Run, T]], where: str, notes: list[str]) -> list[list[T]]:
    """``[(run, item), ...]`` of one table cell -> the items grouped by experiment (one group: nothing to say). With
    several, a note naming the keys that differ and each group's values and runs is appended to ``notes``."""
    groups = group_experiments([(run.config, (run, item)) for run, item in entries])
    if len(groups) > 1:
        keys = distinguishing([run.config for run, _ in entries])
        parts = [f"{{{_mark(i)}}} {label(g[0][0].config, keys)} ({', '.join(str(r.run_dir) for r, _ in g)})"
                 for i, g in enumerate(groups)]
        notes.append(f"{where}: {len(groups)} different experiments, not pooled: " + "; ".join(parts))
    return [[item for _, item in g] for g in groups]


def _mark(i: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[i] if i < 26 else str(i)


def _cell(entries: list[tuple[Run, Value]], paper: str | None, where: str, notes: list[str]) -> str:
    if not entries:
        return f"— ({paper})" if paper else ""
    groups = experiments(entries, where, notes)
    text = pool(groups[0]) if len(groups) == 1 else " / ".join(f"{pool(g)} {{{_mark(i)}}}"
                                                               for i, g in enumerate(groups))
    return text + (f" ({paper})" if paper else "")


def _notes(notes: list[str]) -> list[str]:
    return ["", "Not pooled (runs that differ in more than the seed):", *(f"- {n}" for n in notes)] if notes else []


def _row_order(key):
    s, f, tau = key
    return (-s if isinstance(s, (int, float)) else 0, -f, tau)


def table_a(runs: list[Run], paper: dict, metric: str = "auto", algorithms: list[str] | None = None) -> str:
    cells: dict = defaultdict(lambda: defaultdict(list))
    which: dict[str, set[str]] = defaultdict(set)
    for run in runs:
        value, label = table_a_value(run, metric)
        if value is not None:
            cells[(run.split, run.fraction, run.tau)][run.algorithm].append((run, value))
            which[run.algorithm].add(label)
    present = {a for row in cells.values() for a in row}
    algorithms = algorithms or [a for a in COLUMNS if a in present] + sorted(present - set(COLUMNS))
    if not cells:
        return ""
    marks = {a: f"[{i + 1}]" for i, a in enumerate(algorithms)}
    lines = ["Table A: personalised accuracy (%), fl-sd (paper)", "",
             "| s | f | τ | " + " | ".join(f"{COLUMNS.get(a, a)} {marks[a]}" for a in algorithms) + " |",
             "|---|---|---|" + "---|" * len(algorithms)]
    notes: list[str] = []
    for key in sorted(cells, key=_row_order):
        s, f, tau = key
        row = [_cell(cells[key].get(a, []), paper["A"].get((s, f, tau, a)),
                     f"s={s} f={f:g} τ={tau} {COLUMNS.get(a, a)}", notes) for a in algorithms]
        lines.append(f"| {s} | {f:g} | {tau} | " + " | ".join(row) + " |")
    lines.append("")
    for a in algorithms:
        lines.append(f"{marks[a]} {COLUMNS.get(a, a)}: " + "; ".join(sorted(which[a])) + ".")
    return "\n".join(lines + _notes(notes))


def table_b(runs: list[Run], paper: dict) -> str:
    cells: dict = defaultdict(list)
    for run in runs:
        if run.curve and run.fraction == 0.1 and run.tau == 10 and len(run.curve) > 1:
            cells[(run.split, run.algorithm)].append((run, run))
    if not cells:
        return ""
    lines = ["Table B: personalised accuracy (%) after n fine-tuning epochs (f = 0.1, τ = 10), fl-sd (paper)", "",
             "| s | algorithm | " + " | ".join(str(e) for e in TABLE_B_EPOCHS) + " |",
             "|---|---|" + "---|" * len(TABLE_B_EPOCHS)]
    order = list(COLUMNS)
    notes: list[str] = []
    for (s, alg) in sorted(cells, key=lambda k: (-k[0] if isinstance(k[0], int) else 0,
                                                 order.index(k[1]) if k[1] in order else len(order), k[1])):
        groups = experiments(cells[(s, alg)], f"s={s} {COLUMNS.get(alg, alg)}", notes)
        for i, runs in enumerate(groups):
            name = COLUMNS.get(alg, alg) + (f" {{{_mark(i)}}}" if len(groups) > 1 else "")
            row = [_cell([(run, run.curve[e]) for run in runs if e < len(run.curve)], paper["B"].get((s, alg, e)),
                         "", []) for e in TABLE_B_EPOCHS]
            lines.append(f"| {s} | {name} | " + " | ".join(row) + " |")
    lines += ["", "Epoch 0 is the model handed to fine-tuning (the best-on-test global model); epochs beyond a run's "
                  "personalization.epochs are empty."]
    return "\n".join(lines + _notes(notes))


def table_ablation(runs: list[Run], metric: str = "auto") -> str:
    ablations = sorted({r.algorithm for r in runs if r.algorithm.startswith("mhmd_")})
    if not ablations:
        return ""
    columns = ["mhmd", *ablations]
    body = table_a([r for r in runs if r.algorithm in columns], {"A": {}, "B": {}}, metric, columns)
    body = body.replace("Table A: personalised accuracy (%), fl-sd (paper)",
                        "Ablation table: MHMD and its loss ablations, accuracy (%) (no published values)")
    return body


def table_backbones(runs: list[Run], title: str, model_names: dict[str, str] | None = None) -> str:
    """Rows (s, f, tau); per (algorithm, model) two columns: the best evaluation over the rounds ("FL") and the
    personalised accuracy after 5 fine-tuning epochs ("FT"). No published values exist for these tables."""
    cells: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = (run.split, run.fraction, run.tau)
        for metric in ("global", "personalized"):
            value, _ = table_a_value(run, metric)
            if value is not None:
                cells[key][(run.algorithm, run.model, metric)].append((run, value))
    if not cells:
        return ""
    order = list(COLUMNS)
    groups = sorted({(a, m) for row in cells.values() for a, m, _ in row},
                    key=lambda g: (order.index(g[0]) if g[0] in order else len(order), g[0], g[1]))
    names = model_names or {}
    columns = [(a, m, metric) for a, m in groups for metric in ("global", "personalized")]
    label = {"global": "FL", "personalized": "FT"}
    lines = [title, "", "| s | f | τ | " + " | ".join(
        f"{COLUMNS.get(a, a)}{' ' + names.get(m, m) if model_names is not None else ''} {label[metric]}"
        for a, m, metric in columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    notes: list[str] = []
    for key in sorted(cells, key=_row_order):
        s, f, tau = key
        row = [_cell(cells[key].get(c, []), None,
                     f"s={s} f={f:g} τ={tau} {COLUMNS.get(c[0], c[0])} {names.get(c[1], c[1])} {label[c[2]]}", notes)
               for c in columns]
        lines.append(f"| {s} | {f:g} | {tau} | " + " | ".join(row) + " |")
    lines += ["", "FL: best evaluation over the rounds of federated training (best-on-test, no fine-tuning). FT: "
                  f"personalised accuracy after {TABLE_A_EPOCH} fine-tuning epochs (fewer if the run fine-tuned fewer) "
                  "of the best-on-test model. Mean ± std over clients."]
    return "\n".join(lines + _notes(notes))


def _why_none(runs: list[Run]) -> str:
    tuned = sum(1 for r in runs if r.curve)
    b = sum(1 for r in runs if r.curve and len(r.curve) > 1 and r.fraction == 0.1 and r.tau == 10)
    return (f"{tuned} fine-tuned (personalization.enabled), {len(runs) - tuned} without personalisation; "
            f"{sum(1 for r in runs if r.best)} with a best evaluation; Table B needs fine-tuned runs with f = 0.1, "
            f"tau = 10: {b}; the ablation table needs mhmd_* runs: "
            f"{sum(1 for r in runs if r.algorithm.startswith('mhmd_'))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--table", choices=("all", "A", "B", "ablation", "16", "12_13"), default="all",
                        help="16: ResNet-18/50 runs (Table 16); 12_13: cnn4 on CIFAR-10 (Tables 12 and 13)")
    parser.add_argument("--metric", choices=("auto", "personalized", "global"), default="auto",
                        help="auto: each column by its protocol (fine-tuned runs: after 5 epochs; others: best "
                             "evaluation); personalized / global: that metric for every column")
    parser.add_argument("--paper", type=Path, default=DEFAULT_PAPER,
                        help="the published values (PAPER_RESULTS.md); a missing file shows fl-sd's values only")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.run_dirs)
    except RunDirError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if not runs:
        print("error: no finished runs (config.yaml + results.json) among the given directories", file=sys.stderr)
        return 2
    paper = paper_values(args.paper)
    family = defaultdict(list)
    for run in runs:
        family[paper_table(run)].append(run)
    main_runs = family["main"]
    tables = {"A": lambda: table_a([r for r in main_runs if not r.algorithm.startswith("mhmd_")], paper, args.metric),
              "B": lambda: table_b(main_runs, paper), "ablation": lambda: table_ablation(main_runs, args.metric),
              "16": lambda: table_backbones(family["16"], "Table 16: other backbones (CIFAR-100), accuracy (%), fl-sd "
                                                          "only (no published values)", BACKBONES),
              "12_13": lambda: table_backbones(family["12_13"], "Tables 12 (FL) and 13 (FT): 4-conv CNN on CIFAR-10, "
                                                                "accuracy (%), fl-sd only (no published values)")}
    chosen = list(tables) if args.table == "all" else [args.table]
    texts = [t for t in (tables[name]() for name in chosen) if t]
    if not texts:
        print(f"error: no runs for table {args.table} among the {len(runs)} finished runs given ({_why_none(runs)})",
              file=sys.stderr)
        return 2
    print("\n\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

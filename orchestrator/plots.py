"""PNG plots of a run directory: accuracy of each head vs round, the fine-tuning-speed curve, and the distribution
of per-client personalised accuracy."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no backend switch in the caller's process
from matplotlib.ticker import MaxNLocator

from .rundir import EVALUATIONS_FILE, RESULTS_FILE


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    written: list[Path] = []
    evals = _read_csv(run_dir / EVALUATIONS_FILE)
    if evals:
        heads = [k[4:] for k in evals[0] if k.startswith("acc_") and not k.endswith(("_std", "_weighted"))]
        fig, ax = _figure()
        rounds = [int(r["round"]) for r in evals]
        for h in heads:
            mean = [float(r[f"acc_{h}"]) for r in evals]
            std = [float(r[f"acc_{h}_std"]) for r in evals]
            ax.plot(rounds, mean, label=h)
            low, high = accuracy_band(mean, std)
            ax.fill_between(rounds, low, high, alpha=0.15)
        ax.set(xlabel="round", ylabel="test accuracy (%)", title="global model: accuracy of each head")
        integer_ticks(ax)
        ax.legend()
        written.append(_save(fig, run_dir / "accuracy_vs_round.png"))
    results_path = run_dir / RESULTS_FILE
    pers = json.loads(results_path.read_text()).get("personalized") if results_path.exists() else None
    if pers:
        fig, ax = _figure()
        epochs = list(range(len(pers["acc_mean"])))
        low, high = accuracy_band(pers["acc_mean"], pers["acc_std"])
        ax.errorbar(epochs, pers["acc_mean"], yerr=[[m - lo for m, lo in zip(pers["acc_mean"], low)],
                                                    [hi - m for m, hi in zip(pers["acc_mean"], high)]],
                    marker="o", capsize=3)
        ax.set(xlabel="fine-tuning epoch", ylabel="personalised accuracy (%)", title="fine-tuning speed")
        integer_ticks(ax)
        written.append(_save(fig, run_dir / "finetune_curve.png"))
        fig, ax = _figure()
        final = [row[-1] for row in pers["per_client"]]
        ax.hist(final, bins=min(30, max(5, len(final) // 3)))
        ax.set(xlabel=f"personalised accuracy after {len(epochs) - 1} epochs (%)", ylabel="clients",
               title="per-client personalised accuracy")
        written.append(_save(fig, run_dir / "personalized_distribution.png"))
    return written


def accuracy_band(mean, spread) -> tuple[list[float], list[float]]:
    """``mean ± spread`` clipped to the accuracy range [0, 100]."""
    low = [min(100.0, max(0.0, m - s)) for m, s in zip(mean, spread)]
    high = [min(100.0, max(0.0, m + s)) for m, s in zip(mean, spread)]
    return low, high


def integer_ticks(ax) -> None:
    """Rounds and epochs are counts: integer ticks on the x axis."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure():
    fig = Figure(figsize=(6, 4))
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path

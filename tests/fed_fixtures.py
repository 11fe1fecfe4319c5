"""A tiny federation, reused by the orchestrator tests (as Lightning's "boring" fixtures)."""
from __future__ import annotations

from pathlib import Path

from orchestrator.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def tiny_config(run_dir: Path | str, *overrides: str, base: str = "configs/smoke.yaml") -> Config:
    """configs/smoke.yaml (synthetic, cnn4, 10 clients) with quiet tracking and dotted overrides."""
    return load_config(REPO / base, ["--run_dir", str(run_dir), "--tracking.progress", "false",
                                     "--tracking.wandb", "disabled", "--tracking.plots", "false", *overrides])

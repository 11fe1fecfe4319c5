"""A tiny federation, reused by the orchestrator tests (as Lightning's "boring" fixtures)."""
from __future__ import annotations

from pathlib import Path

import torch

from orchestrator.config import Config, load_config
from orchestrator.federation import Federation

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: A smaller federation than smoke.yaml: 4 clients (2 per round) of 20 16x16 images, a width-8 cnn4, batches of 10.
TINY = ("--data.num_clients", "4", "--data.synthetic",
        "{num_classes: 4, train_per_class: 20, test_per_class: 5, image_size: 16}", "--model.options", "{width: 8}",
        "--federation.batch_size", "10", "--federation.client_fraction", "0.5", "--federation.eval_every", "1",
        "--personalization.epochs", "1", "--checkpoint.every", "1")


def tiny_config(run_dir: Path | str, *overrides: str, base: str = "configs/smoke.yaml") -> Config:
    """configs/smoke.yaml (synthetic, cnn4, 10 clients) with quiet tracking and dotted overrides."""
    return load_config(REPO / base, ["--run_dir", str(run_dir), "--tracking.progress", "false",
                                     "--tracking.wandb", "disabled", "--tracking.plots", "false", *overrides])


def make_fed(tmp_path: Path, *overrides: str, name: str = "run") -> Federation:
    """A Federation of configs/smoke.yaml (+ overrides) in ``tmp_path / name``."""
    return Federation(tiny_config(tmp_path / name, *overrides), tmp_path / name)


def snapshot(state: dict[str, torch.Tensor], keys=None) -> dict[str, torch.Tensor]:
    return {k: state[k].detach().clone() for k in (state if keys is None else keys)}


def differs(a: dict, b: dict, keys) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in keys)

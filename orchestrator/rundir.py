"""The run directory: what a run writes where, and how a directory is started, found and reopened.

    runs/<name>/config.yaml         the resolved config (what --resume reads)
               partition.npz        the clients' train/test index sets
               checkpoint.pt        the whole federation's state (orchestrator.checkpoint)
               rounds.csv, evaluations.csv, personalization.csv, results.json, *.png, wandb/, wandb_id.txt
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import RunDirError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

CONFIG_FILE = "config.yaml"
PARTITION_FILE = "partition.npz"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
ROUNDS_FILE = "rounds.csv"
EVALUATIONS_FILE = "evaluations.csv"
PERSONALIZATION_FILE = "personalization.csv"
WANDB_ID_FILE = "wandb_id.txt"


def resolve_run_dir(cfg: "Config") -> Path:
    """``cfg.run_dir``, else ``runs/<name>`` (the name derived from the config when unset; written back to cfg)."""
    if cfg.name is None:
        cfg.name = cfg.default_name()
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def prepare_new_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` for a new run; refuse one that already holds a run, or that cannot be written."""
    if (run_dir / CHECKPOINT_FILE).exists() or (run_dir / RESULTS_FILE).exists():
        raise RunDirError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "or set run_dir/name to a new directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write run directory {run_dir} ({err.strerror}); choose a writable run_dir") from None


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The raw config a run was started with (its ``config.yaml``); ``orchestrator.config.load_run_config`` types it."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    if not path.exists():
        raise RunDirError(f"--resume {run_dir}: not an fl-sd run directory (no {CONFIG_FILE}); pass the directory "
                          "a run was started in")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{path} is not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} does not hold a config mapping; the run directory is damaged")
    return data

"""Atomic checkpoints of a whole federation: written to a temporary file, fsynced, then renamed over the old one."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fl_sd.io import atomic_write

from .errors import CheckpointError
from .rundir import CHECKPOINT_FILE

#: 2: per-client kept state is one flat state dict per client (1: nested by part name; migrated on load).
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)


def save_checkpoint(run_dir: Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    path = Path(run_dir) / CHECKPOINT_FILE
    payload = {"format": FORMAT_VERSION, "meta": meta, "state": state}
    atomic_write(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Load and check a checkpoint against the run's identity (model, classes, clients); returns its state with
    ``state["format"]`` set to the file's format version."""
    payload = read_checkpoint(run_dir)
    check_meta(run_dir, payload["meta"], meta)
    return payload["state"]


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    """``{"meta": ..., "state": ...}`` of a run's checkpoint, unchecked (``state["format"]`` set); CheckpointError
    if missing or corrupt."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the run stopped before its first checkpoint; "
                              "start it again without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (pickle/zip errors of every kind)
        raise CheckpointError(f"checkpoint {path} is corrupt ({type(err).__name__}); delete it and start the run "
                              "again, or resume from a copy") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS or "state" not in payload:
        raise CheckpointError(f"{path} is not an fl-sd checkpoint (format {FORMAT_VERSION})")
    return {"meta": payload.get("meta", {}), "state": {**payload["state"], "format": payload["format"]}}


def check_meta(run_dir: Path, saved: dict[str, Any], meta: dict[str, Any]) -> None:
    """The checkpoint's identity keys (model, classes, clients, ...) must equal the run's."""
    for key, value in meta.items():
        if key != "config" and saved.get(key) != value:
            raise CheckpointError(f"checkpoint {Path(run_dir) / CHECKPOINT_FILE} was written for "
                                  f"{key}={saved.get(key)!r}, the config says {value!r}; resume with the run's own "
                                  "config.yaml")

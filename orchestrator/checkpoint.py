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
    saved = payload.get("meta", {})
    for key, value in meta.items():
        if saved.get(key) != value:
            raise CheckpointError(f"checkpoint {path} was written for {key}={saved.get(key)!r}, the config says "
                                  f"{value!r}; resume with the run's own config.yaml")
    return {**payload["state"], "format": payload["format"]}

"""Atomic checkpoints (orchestrator/checkpoint.py)."""
from __future__ import annotations

import pytest
import torch

from orchestrator import checkpoint as ckpt
from orchestrator.errors import CheckpointError
from orchestrator.rundir import CHECKPOINT_FILE


def test_killed_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    meta = {"model": "m"}
    ckpt.save_checkpoint(tmp_path, {"round": 1, "x": torch.ones(3)}, meta)

    def dying_save(obj, fh):
        fh.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, {"round": 2, "x": torch.zeros(3)}, meta)
    monkeypatch.undo()
    state = ckpt.load_checkpoint(tmp_path, meta)
    assert state["round"] == 1 and torch.equal(state["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary file left behind




def test_checkpoint_meta_mismatch_and_foreign_file(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"round": 1}, {"model": "cnn4", "seed": 1})
    assert ckpt.load_checkpoint(tmp_path, {"model": "cnn4"})["format"] == ckpt.FORMAT_VERSION
    with pytest.raises(CheckpointError, match="written for model='cnn4', the config says 'mobilenet'"):
        ckpt.load_checkpoint(tmp_path, {"model": "mobilenet"})
    torch.save({"something": "else"}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not an fl-sd checkpoint"):
        ckpt.load_checkpoint(tmp_path, {})
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nowhere", {})

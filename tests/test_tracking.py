"""Run tracking (orchestrator/tracking.py): W&B offline, and tracking failures that must not kill a run."""
from __future__ import annotations

import pytest

from fed_fixtures import tiny_config
from orchestrator.runner import run


def test_wandb_offline_records_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "2", "--personalization.epochs", "1",
                      "--tracking.wandb", "offline")
    res = run(cfg)
    assert res["rounds"] == 2
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 1000  # the offline run file holds the logged history
    assert (tmp_path / "run" / "wandb_id.txt").read_text().strip() in files[0].name


def test_tracking_failure_is_a_warning_not_fatal(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise ConnectionError("no route to the W&B server")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "2", "--personalization.epochs", "1",
                      "--tracking.wandb", "online")
    with pytest.warns(UserWarning, match="W&B tracking disabled"):
        res = run(cfg)
    assert res["rounds"] == 2 and (tmp_path / "run" / "results.json").exists()


def test_wandb_group_and_job_type_reach_wandb(tmp_path, monkeypatch):
    """A sweep groups its runs by cell (group) and algorithm (job_type) so that the W&B UI compares them."""
    import wandb

    seen = {}
    real_init = wandb.init

    def recording_init(*args, **kwargs):
        seen.update(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "1", "--personalization.enabled", "false",
                      "--tracking.wandb", "offline", "--tracking.group", "sweep/c10_s2",
                      "--tracking.job_type", "mhmd_aux")
    run(cfg)
    assert seen["group"] == "sweep/c10_s2" and seen["job_type"] == "mhmd_aux"

"""Run tracking (orchestrator/tracking.py): W&B offline, and tracking failures that must not kill a run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fed_fixtures import REPO, tiny_config
from orchestrator.runner import run
from orchestrator.wandb_files import history_steps


def test_wandb_offline_records_the_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "2", "--personalization.epochs", "1",
                      "--tracking.wandb", "offline")
    res = run(cfg)
    assert res["rounds"] == 2
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and history_steps(files[0]) == [1, 2]  # the offline run file holds the logged history
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


def test_wandb_offline_kill_9_and_resume_keeps_every_round_in_the_run_history(tmp_path):
    """kill -9 mid-run, then --resume: the resumed run is the same W&B run (one id) and its history holds every round
    once, in order (rounds the killed process logged are not sent again; the others are replayed or trained)."""
    run_dir = tmp_path / "run"
    # no WANDB_* from this process: an earlier in-process wandb.init leaves WANDB_SERVICE (its service's address) in
    # os.environ, and children would then write through this process's W&B service instead of their own
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
           "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    main = [sys.executable, str(REPO / "orchestrator" / "main.py")]
    victim = subprocess.Popen(main + ["--config", "configs/smoke.yaml", "--federation.rounds", "5",
                                      "--checkpoint.every", "2", "--personalization.epochs", "1", "--run_dir",
                                      str(run_dir), "--tracking.plots", "false", "--tracking.progress", "false"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not ((run_dir / "checkpoint.pt").exists() and (run_dir / "wandb_logged.txt").exists()
               and int((run_dir / "wandb_logged.txt").read_text() or 0) >= 3):
        if victim.poll() is not None or time.time() > deadline:
            pytest.fail(f"the run ended before it could be killed: {victim.communicate()[0]}")
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = subprocess.run(main + ["--resume", str(run_dir)], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert files  # one W&B run (one id): each process's offline folder, synced together
    steps = [s for f in files for s in history_steps(f)]  # the killed process's file may hold none (unflushed)
    assert steps == [1, 2, 3, 4, 5], [(f.parent.name, history_steps(f)) for f in files]  # every round once, in order
    assert "wandb sync" in resumed.stdout + resumed.stderr

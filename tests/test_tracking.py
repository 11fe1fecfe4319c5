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


class RecordingProgress:
    """Stands in for rich's Progress: records every task's fields as the tracker updates them."""

    def __init__(self, *columns, **kwargs):
        self.tasks: dict[int, dict] = {}
        self.console = self

    def start(self):
        pass

    def stop(self):
        pass

    def print(self, text):
        pass

    def add_task(self, description, **fields):
        self.tasks[len(self.tasks)] = {"description": description, **fields}
        return len(self.tasks) - 1

    def update(self, task, **fields):
        self.tasks[task].update(fields)


def evaluation_record(round_idx: int, acc: float) -> dict:
    record = {"round": round_idx, "best_round": round_idx, "best_acc_final": acc}
    for head in ("final", "aux0"):
        record.update({f"acc_{head}": acc, f"acc_{head}_std": 1.0})
    return record


def test_progress_bar_shows_the_evaluation_of_the_round_just_logged(tmp_path, monkeypatch):
    """The accuracy on the bar is the evaluation of the round the bar has just reached, not the previous one's; a
    round without evaluation keeps the last one."""
    from orchestrator import tracking

    monkeypatch.setattr(tracking, "Progress", RecordingProgress)
    cfg = tiny_config(tmp_path / "run", "--tracking.progress", "true")
    (tmp_path / "run").mkdir()
    tracker = tracking.Tracker(cfg, tmp_path / "run", total_rounds=3)
    seen = []
    real_update = RecordingProgress.update

    def update(self, task, **fields):
        real_update(self, task, **fields)
        seen.append((self.tasks[task]["completed"], self.tasks[task]["latest"]))

    monkeypatch.setattr(RecordingProgress, "update", update)
    log = []
    for r, acc in ((1, 11.0), (2, None), (3, 33.0)):
        log.append({"round": r, "train_loss": 1.0})
        tracker.log_round(log[-1], log, evaluation_record(r, acc) if acc is not None else None)
    tracker.close()
    assert seen == [(1, "acc 11.00% (best 11.00%)"), (2, "acc 11.00% (best 11.00%)"), (3, "acc 33.00% (best 33.00%)")]


def test_personalisation_progress_lines_without_a_bar(tmp_path, capsys):
    """Without a bar, personalisation prints a line every 10 % of the clients and for the last one (fewer than ten
    clients: only the last)."""
    from orchestrator import tracking

    cfg = tiny_config(tmp_path / "run", "--tracking.progress", "false")
    (tmp_path / "run").mkdir()
    tracker = tracking.Tracker(cfg, tmp_path / "run", total_rounds=1)
    capsys.readouterr()
    for total in (4, 100):
        for done in range(1, total + 1):
            tracker.personalization_progress(done, total)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ([f"personalising: {d}/4 clients fine-tuned" for d in (4,)]
                     + [f"personalising: {d}/100 clients fine-tuned" for d in range(10, 101, 10)])


def test_wandb_plots_are_logged_at_the_last_round_not_past_it(tmp_path):
    """The end-of-run plots and the fine-tuning curve go to the last round's W&B step: the history has one step per
    round and none beyond."""
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "2", "--personalization.epochs", "1",
                      "--tracking.wandb", "offline", "--tracking.plots", "true")
    run(cfg)
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert list((tmp_path / "run").glob("*.png"))  # plots were made (and logged)
    assert len(files) == 1 and history_steps(files[0]) == [1, 2]

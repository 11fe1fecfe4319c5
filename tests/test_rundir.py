"""Run directories (orchestrator/rundir.py, runner.py): one process per directory, no half-made or unshareable
runs, names that stay inside runs/, paths that work from any directory, resumes that refuse another experiment."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import yaml

from fed_fixtures import REPO, tiny_config
from orchestrator.config import load_config
from orchestrator.errors import CheckpointError, ConfigError, RunDirError
from orchestrator.main import main
from orchestrator.rundir import CHECKPOINT_FILE, CONFIG_FILE, LOCK_FILE, RunDirLock
from orchestrator.runner import run

SMOKE = str(REPO / "configs" / "smoke.yaml")


def _cli(*args, cwd=REPO):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "orchestrator" / "main.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirError, match=f"in use by another fl-sd process \\(pid {os.getpid()}\\)"):
            RunDirLock(tmp_path).acquire()
    RunDirLock(tmp_path).acquire().release()  # released: free again, although the .lock file stays


def test_two_processes_on_one_run_dir_and_resume_after_kill_9(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", SMOKE, "--run_dir", str(run_dir), "--tracking.progress", "false", "--tracking.plots",
              "false", "--federation.rounds", "400", "--checkpoint.every", "1", "--personalization.epochs", "0"]
    first = _cli(*common)
    try:
        deadline = time.time() + 240
        while not (run_dir / CHECKPOINT_FILE).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        assert (run_dir / LOCK_FILE).read_text().strip() == str(first.pid)
        second = _cli(*common)  # the same run directory, while the first one runs
        _, err = second.communicate(timeout=240)
        assert second.returncode == 2 and err.count("\n") == 1
        assert f"in use by another fl-sd process (pid {first.pid})" in err
        resumed = _cli("--resume", str(run_dir))  # --resume of a run that is still running
        _, err = resumed.communicate(timeout=240)
        assert resumed.returncode == 2 and f"pid {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / LOCK_FILE).exists()  # the stale lock file of a killed process ...
    data = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    done = int(__import__("torch").load(run_dir / CHECKPOINT_FILE, weights_only=False)["state"]["round"])
    data["federation"]["rounds"] = done + 1  # a short finish (more rounds than done: an allowed edit)
    (run_dir / CONFIG_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    resumed = _cli("--resume", str(run_dir))  # ... does not block a resume
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err


def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    argv = ["--config", SMOKE, "--run_dir", str(tmp_path / "runs" / "r"), "--data.dataset", "npz", "--data.path",
            str(missing), "--tracking.progress", "false"]
    assert main(argv) == 2 and "nope.npz" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "r").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert main(argv[:3] + [str(existing)] + argv[4:]) == 2
    assert sorted(p.name for p in existing.iterdir()) == [LOCK_FILE, "notes.txt"]  # nothing of the run is left


def test_run_files_are_shareable_and_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        cfg = load_config(SMOKE, ["--name", "rel", "--federation.rounds", "2", "--personalization.epochs", "1",
                                  "--tracking.progress", "false", "--tracking.plots", "false", "--data.root", "data"])
        run(cfg)
    finally:
        os.umask(old)
    run_dir = tmp_path / "runs" / "rel"
    for name in (CONFIG_FILE, CHECKPOINT_FILE, "partition.npz", "results.json", "rounds.csv"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o644, name
    stored = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    assert stored["run_dir"] == str(run_dir) and stored["data"]["root"] == str(tmp_path / "data")
    assert stored["tracking"]["wandb"] == "disabled"  # the resolved mode, not null: a resume tracks the same way


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", ""])
def test_name_that_leaves_the_runs_directory_is_refused(name):
    with pytest.raises(ConfigError, match="config key name: .*not a plain directory name"):
        load_config(SMOKE, ["--name", name])


def test_default_names_tell_experiments_apart():
    a = load_config(SMOKE, ["--federation.lr", "0.1"]).default_name()
    b = load_config(SMOKE, ["--federation.lr", "0.01"]).default_name()
    c = load_config(SMOKE, ["--data.dataset", "npz", "--data.path", "/d/one.npz"]).default_name()
    d = load_config(SMOKE, ["--data.dataset", "npz", "--data.path", "/d/two.npz"]).default_name()
    assert len({a, b, c, d}) == 4 and "lr0.1" in a and "npz_one" in c


def test_resume_refuses_an_edited_config_and_says_what_differs(tmp_path):
    run_dir = tmp_path / "run"
    run(tiny_config(run_dir, "--federation.rounds", "4", "--personalization.epochs", "0"), stop_after=3)
    path = run_dir / CONFIG_FILE
    original = yaml.safe_load(path.read_text())
    edits = {("federation", "lr"): 0.5, ("seed", None): 9, ("data", "alpha"): 0.3, ("federation", "rounds"): 1}
    for (section, key), value in edits.items():
        data = yaml.safe_load(path.read_text())
        if key is None:
            data[section] = value
        else:
            data[section][key] = value
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        with pytest.raises(CheckpointError, match="edited in a way that changes the run") as err:
            run(None, resume=run_dir)
        assert (f"{section}.{key}" if key else section) in str(err.value)
        path.write_text(yaml.safe_dump(original, sort_keys=False))
    data = yaml.safe_load(path.read_text())
    data["federation"]["rounds"] = 5  # more rounds: an allowed edit (README)
    data["tracking"]["plots"] = False
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert run(None, resume=run_dir)["rounds"] == 5

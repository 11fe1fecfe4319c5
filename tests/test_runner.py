"""Running a federation (orchestrator/runner.py): exact resume (also after SIGKILL), divergence, run directories."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fed_fixtures import REPO, TINY, tiny_config
from orchestrator import checkpoint as ckpt
from orchestrator.errors import TrainingDiverged
from orchestrator.main import main
from orchestrator.rundir import CHECKPOINT_FILE
from orchestrator.runner import run

FAST = ["--federation.rounds", "6", "--personalization.epochs", "1", "--name", "t"]


def comparable(results: dict) -> dict:
    res = json.loads(json.dumps(results))
    res["personalized"].pop("seconds")
    return res


# -- resume -------------------------------------------------------------------------------------------------------
def test_resume_in_process_equals_uninterrupted(tmp_path):
    full = run(tiny_config(tmp_path / "full", *FAST))
    assert run(tiny_config(tmp_path / "cut", *FAST), stop_after=3) == {}
    state = torch.load(tmp_path / "cut" / CHECKPOINT_FILE, weights_only=False)["state"]
    assert state["round"] == 2  # checkpoint.every 2: the last one before the cut
    resumed = run(None, resume=tmp_path / "cut")
    assert comparable(resumed) == comparable(full)  # bitwise: every random draw derives from (seed, round, client)


def _cli(*args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "orchestrator" / "main.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_gives_same_final_metrics(tmp_path):
    common = ["--config", "configs/smoke.yaml", "--federation.rounds", "16", "--federation.eval_every", "2",
              "--checkpoint.every", "2", "--personalization.epochs", "1", "--name", "k", "--tracking.plots", "false"]
    ref = _cli(*common, "--run_dir", str(tmp_path / "ref"))
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    victim_dir = tmp_path / "victim"
    victim = _cli(*common, "--run_dir", str(victim_dir))
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once a checkpoint exists and training is under way
        cp = victim_dir / CHECKPOINT_FILE
        if cp.exists() and (victim_dir / "rounds.csv").exists():
            rounds_done = len((victim_dir / "rounds.csv").read_text().splitlines()) - 1
            if rounds_done >= 3:
                break
        if victim.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    saved = torch.load(victim_dir / CHECKPOINT_FILE, weights_only=False)["state"]["round"]
    assert 2 <= saved < 16
    resumed = _cli("--resume", str(victim_dir))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = comparable(json.loads((tmp_path / "ref" / "results.json").read_text()))
    b = comparable(json.loads((victim_dir / "results.json").read_text()))
    assert a == b


def test_sigterm_checkpoints_says_how_to_resume_and_resume_is_exact(tmp_path):
    """What a cluster scheduler sends: the run stops after the current round, checkpoints it (between the
    checkpoint.every ones), exits 143 with one line naming --resume and the real run directory; the resume's results
    equal an uninterrupted run's."""
    common = ["--config", "configs/smoke.yaml", "--federation.rounds", "4", "--checkpoint.every", "2",
              "--personalization.epochs", "1", "--name", "t", "--tracking.plots", "false", "--tracking.progress",
              "false"]
    ref = _cli(*common, "--run_dir", str(tmp_path / "ref"))
    victim_dir = tmp_path / "victim"
    victim = _cli(*common, "--run_dir", str(victim_dir))
    deadline = time.time() + 300
    while not (victim_dir / CHECKPOINT_FILE).exists():  # the first checkpoint (round 2)
        if victim.poll() is not None or time.time() > deadline:
            pytest.fail(f"no checkpoint before the run ended: {victim.communicate()}")
        time.sleep(0.02)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=300)
    assert victim.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM (checkpoint of round "), err
    assert lines[0].endswith(f"; continue with --resume {victim_dir}") and "RUN_DIR" not in err
    stopped = int(lines[0].split("checkpoint of round ")[1].split(" ")[0])
    saved = torch.load(victim_dir / CHECKPOINT_FILE, weights_only=False)["state"]["round"]
    assert saved == stopped and 2 <= stopped < 4 and not (victim_dir / "results.json").exists()
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    resumed = _cli("--resume", str(victim_dir))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    a = comparable(json.loads((tmp_path / "ref" / "results.json").read_text()))
    b = comparable(json.loads((victim_dir / "results.json").read_text()))
    assert a == b


def test_nan_loss_stops_naming_round_and_client_and_keeps_checkpoint(tmp_path, monkeypatch):
    from fl_sd.losses import MultiHeadLoss

    real_forward = MultiHeadLoss.forward
    calls = {"n": 0}

    def forward(self, output, target):
        calls["n"] += 1
        out = real_forward(self, output, target)
        if calls["n"] > 60:  # after ~3 rounds of 5 clients x 2 steps x ... : poison the loss
            return out._replace(total=out.total * float("nan"))
        return out

    monkeypatch.setattr(MultiHeadLoss, "forward", forward)
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "20", "--checkpoint.every", "1")
    with pytest.raises(TrainingDiverged, match=r"round \d+.*client \d+"):
        run(cfg)
    state = ckpt.load_checkpoint(tmp_path / "run", {})
    assert state["round"] >= 1
    assert all(torch.isfinite(v.float()).all() for v in state["global_state"].values())


def test_existing_run_dir_refused_and_corrupt_or_mismatched_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "4", "--name", "x")
    run(cfg, stop_after=2)
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--run_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a different experiment" in err and "federation.rounds: 4 -> 6" in err
    assert "--resume" not in err.replace("do not --resume", "")  # never suggest continuing another experiment
    same = argv + ["--federation.rounds", "4", "--name", "x"]
    assert main(same) == 2
    err = capsys.readouterr().err
    assert "already holds this run" in err and f"--resume {tmp_path / 'run'}" in err
    # a checkpoint of another model: the run's config now says mobilenet
    cfg_path = tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(cfg_path.read_text())
    data["model"]["name"] = "mobilenet"
    data["model"]["options"] = {}
    cfg_path.write_text(yaml.safe_dump(data))
    assert main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cnn4" in err and "mobilenet" in err
    # a corrupt checkpoint
    data["model"]["name"] = "cnn4"
    data["model"]["options"] = {"width": 16}
    cfg_path.write_text(yaml.safe_dump(data))
    (tmp_path / "run" / CHECKPOINT_FILE).write_bytes(b"\x00garbage" * 10)
    assert main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err





# -- divergence without NaN, Ctrl-C, the closing line --------------------------------------------------------------
def test_divergence_without_nan_stops_the_run_with_exit_3(tmp_path, capsys):
    """FedAvg at lr 50 on the smoke federation blows up without a NaN (loss 568 -> 1e13, exit 0 before): the loss bound
    stops it; with the loss bound off, the weight bound does."""
    huge = ["--algorithm.name", "fedavg", "--federation.lr", "50", "--personalization.epochs", "1"]
    with pytest.raises(TrainingDiverged, match=r"federation\.diverge_loss 1000"):
        run(tiny_config(tmp_path / "loss", *huge))
    with pytest.raises(TrainingDiverged, match=r"federation\.diverge_weight 1000"):
        run(tiny_config(tmp_path / "weight", *huge, "--federation.diverge_loss", "null",
                        "--federation.diverge_weight", "1000"))
    smoke = str(REPO / "configs" / "smoke.yaml")
    assert main(["--config", smoke, *huge, "--run_dir", str(tmp_path / "cli"), "--tracking.progress", "false",
                 "--tracking.plots", "false", "--tracking.wandb", "disabled"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: training diverged at round 1") and "diverge_loss" in err[0]
    assert not (tmp_path / "cli" / "results.json").exists()


def test_ctrl_c_names_the_real_run_directory(tmp_path, capsys, monkeypatch):
    from orchestrator.federation import Federation

    real_round, calls = Federation.run_round, {"n": 0}

    def run_round(self, backend):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_round(self, backend)

    monkeypatch.setattr(Federation, "run_round", run_round)
    run_dir = tmp_path / "run"
    smoke = str(REPO / "configs" / "smoke.yaml")
    assert main(["--config", smoke, "--run_dir", str(run_dir), "--tracking.progress", "false", "--tracking.plots",
                 "false", "--tracking.wandb", "disabled"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: stopped by Ctrl-C"), err
    assert err[0].endswith(f"--resume {run_dir}") and "RUN_DIR" not in err[0]


def test_closing_line_and_the_resolved_wandb_mode_are_stored(tmp_path, capsys, monkeypatch):
    """The run ends with one line saying where its results and checkpoint are; config.yaml stores the W&B mode the
    run resolved (not null), so a resume tracks as the start did whatever $WANDB_MODE says then."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = tiny_config(tmp_path / "run", *TINY, "--federation.rounds", "2", "--tracking.wandb", "null")
    assert cfg.tracking.wandb is None
    run(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("done: personalised") and str(tmp_path / "run" / "results.json") in out[-1]
    assert str(tmp_path / "run" / CHECKPOINT_FILE) in out[-1]
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["tracking"]["wandb"] == "disabled"



def test_sigterm_while_the_backend_starts_stops_at_once(tmp_path):
    """A backend can take minutes to start (Flower waiting for Ray): a SIGTERM then stops the run at once (nothing
    to finish; the run directory resumes from its last checkpoint), instead of waiting for a round to end."""
    from orchestrator.backends import make_backend

    def slow_start(cfg, run_dir, runtime, algorithm):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return make_backend("inprocess", cfg, run_dir, runtime, algorithm)

    cfg = tiny_config(tmp_path / "run", *TINY, "--federation.rounds", "3")
    from orchestrator.errors import RunInterrupted

    with pytest.raises(RunInterrupted) as info:
        run(cfg, backend_factory=slow_start)
    assert info.value.round == 0 and not info.value.checkpointed and not (tmp_path / "run" / CHECKPOINT_FILE).exists()
    assert f"--resume {tmp_path / 'run'}" in str(info.value)
    assert run(None, resume=tmp_path / "run")["rounds"] == 3  # a run stopped before its first round resumes


def test_sigterm_while_the_data_loads_ends_with_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """SIGTERM before the round loop's handler exists (here: while the Federation loads its data) is not a silent
    death: exit 143, one line saying nothing is to be resumed, no half-made run directory, and the caller's own
    SIGTERM handler back in place afterwards."""
    from orchestrator import runner

    real = runner.Federation

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "Federation", slow_load)
    before = signal.getsignal(signal.SIGTERM)
    run_dir = tmp_path / "run"
    smoke = str(REPO / "configs" / "smoke.yaml")
    assert main(["--config", smoke, "--run_dir", str(run_dir), "--tracking.progress", "false", "--tracking.wandb",
                 "disabled"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: stopped by SIGTERM before the run started (nothing to resume); start it again"], err
    assert not run_dir.exists()
    assert signal.getsignal(signal.SIGTERM) == before

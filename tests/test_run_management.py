"""Checkpoints and exact resume (also after SIGKILL), atomic writes, divergence, and bad input -> one clear line."""
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

from fed_fixtures import REPO, tiny_config
from orchestrator import checkpoint as ckpt
from orchestrator.federation import TrainingDiverged
from orchestrator.main import main
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
    state = torch.load(tmp_path / "cut" / ckpt.CHECKPOINT, weights_only=False)["state"]
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
        cp = victim_dir / ckpt.CHECKPOINT
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
    saved = torch.load(victim_dir / ckpt.CHECKPOINT, weights_only=False)["state"]["round"]
    assert 2 <= saved < 16
    resumed = _cli("--resume", str(victim_dir))
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    a = comparable(json.loads((tmp_path / "ref" / "results.json").read_text()))
    b = comparable(json.loads((victim_dir / "results.json").read_text()))
    assert a == b


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
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT]  # no temporary file left behind


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


# -- bad input: one line, non-zero exit, no traceback -----------------------------------------------------------------
def _write(path, text):
    path.write_text(text)
    return str(path)


def bad_inputs(tmp_path):
    smoke = str(REPO / "configs" / "smoke.yaml")
    base = ["--config", smoke, "--run_dir", str(tmp_path / "r"), "--tracking.progress", "false"]
    corrupt_npz = tmp_path / "corrupt.npz"
    corrupt_npz.write_bytes(os.urandom(256))
    not_a_run = tmp_path / "empty_dir"
    not_a_run.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ("typo key in YAML", ["--config", _write(tmp_path / "t.yaml", "federation:\n  roundz: 3\n")], "roundz"),
        ("typo key on command line", base + ["--federation.roundz", "3"], "roundz"),
        ("wrong type", base + ["--federation.rounds", "abc"], "federation.rounds"),
        ("fraction out of range", base + ["--federation.client_fraction", "1.5"], "federation.client_fraction"),
        ("zero rounds", base + ["--federation.rounds", "0"], "federation.rounds"),
        ("negative lr", base + ["--federation.lr", "-0.1"], "federation.lr"),
        ("unknown algorithm", base + ["--algorithm.name", "fedfoo"], "algorithm.name"),
        ("unknown model", base + ["--model.name", "vgg99"], "model.name"),
        ("unknown loss preset", base + ["--algorithm.loss", "nope"], "algorithm.loss"),
        ("unknown loss option", base + ["--algorithm.loss_options", "{alpha: 1}"], "algorithm.loss_options"),
        ("unknown algorithm option", base + ["--algorithm.options", "{beta: 1}"], "algorithm.options"),
        ("bad enum", base + ["--personalization.part", "legs"], "personalization.part"),
        ("num_classes vs dataset", base + ["--model.num_classes", "100"], "num_classes"),
        ("npz without path", base + ["--data.dataset", "npz"], "data.path"),
        ("missing npz file", base + ["--data.dataset", "npz", "--data.path", str(tmp_path / "nope.npz")], "nope.npz"),
        ("corrupt npz", base + ["--data.dataset", "npz", "--data.path", str(corrupt_npz)], "corrupt.npz"),
        ("missing CIFAR root", base + ["--data.dataset", "cifar100", "--data.download", "false",
                                       "--data.root", str(tmp_path / "nodata")], "nodata"),
        ("impossible shards", base + ["--data.shards_per_client", "1000"], "shards_per_client"),
        ("shards that do not divide", base + ["--data.num_clients", "3", "--data.shards_per_client", "2"], "shard"),
        ("missing config file", ["--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
        ("invalid YAML", ["--config", _write(tmp_path / "bad.yaml", "seed: [1\n")], "bad.yaml"),
        ("unwritable run dir", ["--config", smoke, "--run_dir", str(a_file / "sub")], "run directory"),
        ("resume of a non-run directory", ["--resume", str(not_a_run)], "not an fl-sd run directory"),
        ("resume of a missing directory", ["--resume", str(tmp_path / "ghost")], "no such directory"),
        ("resume with other options", ["--resume", str(not_a_run), "--seed", "3"], "--resume"),
        ("cuda without a GPU", base + ["--device", "cuda"], "device"),
    ]


def test_at_least_fifteen_bad_inputs_each_one_clear_line(tmp_path, capsys):
    cases = bad_inputs(tmp_path)
    assert len(cases) >= 15
    for label, argv, needle in cases:
        if label == "cuda without a GPU" and torch.cuda.is_available():
            continue
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc != 0, label
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{label}: {err!r}"
        assert "Traceback" not in err and needle.lower() in err.lower(), f"{label}: {err!r}"


def test_existing_run_dir_refused_and_corrupt_or_mismatched_checkpoint(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", "--federation.rounds", "4", "--name", "x")
    run(cfg, stop_after=2)
    argv = ["--config", str(REPO / "configs" / "smoke.yaml"), "--run_dir", str(tmp_path / "run")]
    assert main(argv) == 2 and "already holds a run" in capsys.readouterr().err
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
    (tmp_path / "run" / ckpt.CHECKPOINT).write_bytes(b"\x00garbage" * 10)
    assert main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err


def test_script_prints_no_traceback(tmp_path):
    proc = _cli("--config", "configs/smoke.yaml", "--federation.roundz", "2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "roundz" in err


# -- tracking ----------------------------------------------------------------------------------------------------
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

"""The command line (orchestrator/main.py): bad input -> one clear line and a non-zero exit, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fed_fixtures import REPO
from orchestrator.main import main


def _cli(*args, **kw):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "orchestrator" / "main.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


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
        ("unknown loss option", base + ["--algorithm.loss_options", "{alpha: 1}"], "algorithm.loss_options.alpha"),
        ("unknown algorithm option", base + ["--algorithm.ditto.beta", "1"], "algorithm.ditto.beta"),
        ("abbreviated key", base + ["--federation.round", "3"], "federation.round"),
        ("bad algorithm option value", base + ["--algorithm.name", "ditto", "--algorithm.ditto.lam", "-1"],
         "algorithm.ditto.lam"),
        ("options of another algorithm", base + ["--algorithm.perfedavg.beta", "0.5"], "algorithm.perfedavg"),
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


def test_script_prints_no_traceback(tmp_path):
    proc = _cli("--config", "configs/smoke.yaml", "--federation.roundz", "2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "roundz" in err




def test_console_command_and_script_agree(tmp_path):
    """``fl-sd`` (the setup.cfg entry point) is orchestrator/main.py: same parser, same one-line errors."""
    import shutil

    exe = shutil.which("fl-sd") or str(Path(sys.executable).parent / "fl-sd")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([exe, "--config", "configs/smoke.yaml", "--federation.roundz", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        l for l in _cli("--config", "configs/smoke.yaml", "--federation.roundz", "2").communicate(timeout=120)[1]
        .strip().splitlines()]
    assert "roundz" in proc.stderr

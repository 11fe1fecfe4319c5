"""Sweeps (orchestrator/sweep.py) and comparisons (orchestrator/compare.py): a grid of 2 algorithms x 2 seeds on the
smoke config is interrupted, resumed, and gives the same comparison table as the same grid run in one go."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from fed_fixtures import REPO, TINY
from orchestrator import compare
from orchestrator.errors import SweepError
from orchestrator.sweep import check_jobs, cli_value, load_spec, plan

FAST = dict(zip(TINY[::2], TINY[1::2]))


def write_spec(tmp_path, out, **extra):
    args = {k.lstrip("-"): yaml.safe_load(v) for k, v in FAST.items()}
    args.update({"tracking.wandb": "disabled", "tracking.plots": False, "federation.rounds": 30,
                 "federation.eval_every": 5})
    spec = {"out": str(out), "seeds": [1, 2], "workers": 2, "threads": 1, "baseline": "mhmd", "args": args,
            "algorithms": ["mhmd", {"aux": {"name": "mhmd_aux"}}],
            "cells": {"smoke": {"config": str(REPO / "configs/smoke.yaml")}}, **extra}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(spec_path, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator.sweep", str(spec_path), "--status-every", "5"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sweep_interrupted_then_resumed_gives_the_same_table(tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "swept"
    ref = sweep(write_spec(tmp_path, ref_out, workers=4))
    spec = write_spec(tmp_path, out)
    first = sweep(spec)
    try:
        deadline = time.monotonic() + 240
        partial = []
        while time.monotonic() < deadline and first.poll() is None:  # interrupt once a run is half way
            partial = [d for d in out.glob("smoke/*/s*") if (d / "checkpoint.pt").exists()
                       and not (d / "results.json").exists()]
            if partial:
                break
            time.sleep(0.05)
        assert partial, "no run was caught between its first checkpoint and its end"
        first.send_signal(signal.SIGINT)
        text, _ = first.communicate(timeout=180)
        assert first.returncode == 130, text
        assert "interrupted" in text
        unfinished = [d for d in out.glob("smoke/*/s*") if not (d / "results.json").exists()]
        assert unfinished  # the interruption left work to do
        again = sweep(spec)
        text, _ = again.communicate(timeout=300)
        assert again.returncode == 0, text
        assert "to resume" in text and " 0 to resume" not in text, text
        assert ref.wait(timeout=300) == 0, ref.stdout.read()
    finally:
        for proc in (first, ref):
            if proc.poll() is None:
                proc.kill()
    assert len(list(out.glob("smoke/*/s*/results.json"))) == 4
    table, written = compare.compare([out], baseline="mhmd")
    ref_table, _ = compare.compare([ref_out], baseline="mhmd", plots=False)
    assert table == ref_table
    rows = table.splitlines()
    assert len(rows) == 4 and rows[2].startswith("| smoke | mhmd | 2 |") and rows[3].startswith("| smoke | aux | 2 |")
    assert "—" in rows[2] and "±" in rows[3].split("|")[-2]  # the variant's paired difference to the baseline
    assert {p.name for p in written} >= {"comparison.md", "comparison.csv", "smoke_finetune.png", "smoke_heads.png",
                                         "smoke_clients.png"}
    # a third run of the command finds nothing to do
    done = sweep(spec)
    text, _ = done.communicate(timeout=120)
    assert done.returncode == 0 and "4 runs: 4 done already" in text, text


def test_plan_and_checks(tmp_path):
    spec = load_spec(write_spec(tmp_path, tmp_path / "grid"))
    jobs = plan(spec)
    assert [(j.seed, j.label) for j in jobs] == [(1, "mhmd"), (1, "aux"), (2, "mhmd"), (2, "aux")]  # seeds outermost
    args = dict(zip(jobs[1].args[::2], jobs[1].args[1::2]))
    assert args["--algorithm.name"] == "mhmd_aux" and args["--tracking.job_type"] == "aux"
    assert args["--tracking.group"] == "grid/smoke" and args["--run_dir"].endswith("grid/smoke/aux/s1")
    assert cli_value({"width": 16}) == "{width: 16}" and cli_value(True) == "true" and cli_value(0.5) == "0.5"
    assert set(check_jobs(jobs).values()) == {"new"}
    d = jobs[0].run_dir
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"seed": 99}))
    with pytest.raises(SweepError, match=r"holds a run of another config"):
        check_jobs(jobs)


@pytest.mark.parametrize("change, message", [
    ({"seeds": [1, 1]}, "seeds must be a list of distinct integers"),
    ({"algorithms": [{"x": {"name": "mhmd", "lr": 1}}]}, "takes name and args"),
    ({"baseline": "ditto"}, "baseline 'ditto' is not one of the algorithms"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"workers": 0}, "workers must be an integer >= 1"),
])
def test_bad_sweep_files_are_one_line_errors(tmp_path, change, message):
    with pytest.raises(SweepError, match=message):
        load_spec(write_spec(tmp_path, tmp_path / "bad", **change))


def test_a_typo_in_the_grid_stops_before_any_run(tmp_path):
    spec = load_spec(write_spec(tmp_path, tmp_path / "typo", cells={"c": {"config": str(REPO / "configs/smoke.yaml"),
                                                                          "args": {"federation.rouds": 3}}}))
    with pytest.raises(SweepError, match=r"^cell c, algorithm mhmd, seed 1: .*federation\.rouds"):
        check_jobs(plan(spec))
    assert not (tmp_path / "typo").exists()


def test_a_labelled_variant_of_one_algorithm_is_its_own_column(tmp_path):
    """``mhmd_detach: {name: mhmd, args: {algorithm.loss_options.detach_teacher: true}}`` runs mhmd with the option,
    next to plain mhmd, in its own directory and W&B job type (fl-sd-compare labels runs by sweep_run.json)."""
    from orchestrator.config import parse_args

    path = write_spec(tmp_path, tmp_path / "grid", seeds=[3], algorithms=[
        "mhmd", {"mhmd_detach": {"name": "mhmd", "args": {"algorithm.loss_options.detach_teacher": True}}}])
    plain, detached = plan(load_spec(path))
    assert (plain.label, detached.label) == ("mhmd", "mhmd_detach")
    assert detached.run_dir == tmp_path / "grid/smoke/mhmd_detach/s3" and plain.run_dir != detached.run_dir
    configs = [parse_args(list(job.args))[0] for job in (plain, detached)]
    assert [c.algorithm.name for c in configs] == ["mhmd", "mhmd"]
    assert [c.loss_options().get("detach_teacher") for c in configs] == [None, True]
    assert [c.tracking.job_type for c in configs] == ["mhmd", "mhmd_detach"]

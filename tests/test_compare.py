"""fl-sd-compare (orchestrator/compare.py): only one experiment's seeds are pooled; damaged or unfit run
directories get one line."""
from __future__ import annotations

import json

import pytest
import yaml

from orchestrator import compare


def fake_run(root, name, seed=1, lr=0.1, acc=50.0, personalized=True):
    run = root / name
    run.mkdir(parents=True)
    cfg = {"seed": seed, "name": name, "run_dir": str(run), "tracking": {"wandb": "offline", "group": name},
           "data": {"dataset": "cifar10", "partition": "shards", "shards_per_client": 2, "num_clients": 10},
           "model": {"name": "cnn4"}, "algorithm": {"name": "mhmd"},
           "federation": {"client_fraction": 0.1, "local_epochs": 1, "rounds": 4, "lr": lr}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pers = {"acc_mean": [acc - 10, acc], "acc_std": [1.0, 1.0]} if personalized else None
    (run / "results.json").write_text(json.dumps({"personalized": pers}))
    return run


def test_seeds_pool_but_another_lr_is_listed_apart(tmp_path, capsys):
    fake_run(tmp_path, "a1", seed=1, acc=50.0)
    fake_run(tmp_path, "a2", seed=2, acc=52.0)
    text, _ = compare.compare([tmp_path], plots=False)
    rows = [ln for ln in text.splitlines() if ln.startswith("| cifar10")]
    assert len(rows) == 1 and rows[0].split("|")[2:4] == [" mhmd ", " 2 "] and "Not pooled" not in text
    fake_run(tmp_path, "b1", seed=1, lr=0.05, acc=70.0)
    text, _ = compare.compare([tmp_path], plots=False)
    rows = {ln.split("|")[2].strip(): ln for ln in text.splitlines() if ln.startswith("| cifar10")}
    assert set(rows) == {"mhmd [federation.lr=0.1]", "mhmd [federation.lr=0.05]"}
    assert rows["mhmd [federation.lr=0.1]"].split("|")[3].strip() == "2"
    assert rows["mhmd [federation.lr=0.05]"].split("|")[4].strip().startswith("70.00")
    assert "2 different experiments, not pooled" in text and str(tmp_path / "b1") in text


def test_no_fine_tuned_runs_and_damaged_files_are_one_line(tmp_path, capsys):
    fake_run(tmp_path / "p", "r", personalized=False)
    assert compare.main([str(tmp_path / "p"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 finished runs there ran without personalisation" in err
    bad = fake_run(tmp_path / "q", "r")
    (bad / "results.json").write_text("{not json")
    assert compare.main([str(tmp_path / "q"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json is damaged" in err
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    del cfg["model"]
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    (bad / "results.json").write_text(json.dumps({"personalized": {"acc_mean": [1.0], "acc_std": [0.0]}}))
    assert compare.main([str(tmp_path / "q"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no model.name" in err


def test_result_dirs_finds_each_run_once_and_names_a_missing_path(tmp_path):
    a = fake_run(tmp_path / "sweep", "a")
    b = fake_run(tmp_path / "sweep" / "deeper", "b", personalized=False)  # finished without personalisation: listed
    (tmp_path / "sweep" / "empty").mkdir()
    # a path given twice, and a run given both directly and through its parent, are one directory each
    assert compare.result_dirs([tmp_path / "sweep", a, tmp_path / "sweep"]) == sorted([a, b])
    assert compare.result_dirs([b]) == [b]
    with pytest.raises(compare.RunDirError, match="nowhere: no such file or directory"):
        compare.result_dirs([tmp_path / "nowhere"])

"""The table tool: Tables A, B and the ablation table from run directories, paper values beside, a footnote per column
saying which metric it reports."""
from __future__ import annotations

import json

import yaml

from orchestrator import table

PAPER = """# results
## Table A — personalised accuracy (%)

| s | f | τ | MHMD | FedBABU | FedAvg | FedPer | LG-FedAvg | FedRep | Per-FedAvg | Ditto |
|---|---|---|---|---|---|---|---|---|---|---|
| 100 | 0.1 | 1 | 61.87±5.12 | 49.67±4.92 | 43.92±5.55 | 45.17±4.70 | 40.91±5.50 | 23.84±3.92 | 48.10±7.42 | 45.46±4.73 |

## Table B — fine-tuning speed

| s | algorithm | 0 | 1 | 2 | 3 | 4 | 5 | 10 | 15 | 20 |
|---|---|---|---|---|---|---|---|---|---|---|
| 10 | MHMD | 21.78±7.90 | 65.98±6.16 | 67.79±6.62 | 67.29±6.63 | 68.14±6.27 | 68.13±6.10 | 68.14±6.49 | 68.12±6.31 | 68.72±6.46 |

## What moves these numbers
| 1 | not a row |
"""


def fake_run(root, name, algorithm, s, f, tau, curve=None, best=(10.0, 1.0), seed=1, lr=0.1, **extra):
    run = root / name
    run.mkdir()
    cfg = {"seed": seed, "name": name, "run_dir": str(run), "tracking": {"wandb": "disabled"},
           "data": {"partition": "shards", "shards_per_client": s, "dataset": "cifar100"},
           "algorithm": {"name": algorithm}, "federation": {"client_fraction": f, "local_epochs": tau, "lr": lr}}
    for key, value in extra.items():
        section, sub = key.split("__")
        cfg.setdefault(section, {})[sub] = value
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pers = None if curve is None else {"acc_mean": [c for c, _ in curve], "acc_std": [d for _, d in curve]}
    res = {"personalized": pers, "global_best": {"acc_final": best[0], "acc_final_std": best[1]}}
    (run / "results.json").write_text(json.dumps(res))
    return run


def test_table_a_each_column_by_its_protocol_with_paper_values(tmp_path, capsys):
    (tmp_path / "paper.md").write_text(PAPER)
    curve = [(float(e), 0.5) for e in range(6)]
    runs = [fake_run(tmp_path, "m1", "mhmd", 100, 0.1, 1, curve=curve, seed=1),
            fake_run(tmp_path, "m2", "mhmd", 100, 0.1, 1, curve=[(v + 2, d) for v, d in curve], seed=2),
            fake_run(tmp_path, "r", "fedrep", 100, 0.1, 1, best=(30.0, 3.0)),
            fake_run(tmp_path, "x", "fedavg", 50, 1.0, 4, curve=curve)]
    assert table.main([*map(str, runs), "--table", "A", "--paper", str(tmp_path / "paper.md")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(ln for ln in lines if ln.startswith("| s |"))
    assert header.split("|")[4:7] == [" MHMD [1] ", " FedAvg [2] ", " FedRep [3] "]
    row = next(ln for ln in lines if ln.startswith("| 100 | 0.1 | 1 |"))
    # MHMD: pooled seeds after 5 epochs (5 and 7 -> 6); FedRep: its best evaluation; paper values in brackets
    assert "6.00±0.50 (n=2) (61.87±5.12)" in row and "30.00±3.00 (23.84±3.92)" in row
    assert "— (43.92±5.55)" in row  # a published cell without an fl-sd run
    assert lines.index(row) < lines.index(next(ln for ln in lines if ln.startswith("| 50 | 1 | 4 |")))
    assert "[1] MHMD: personalised accuracy after 5 fine-tuning epochs" in out
    assert "[3] FedRep: best evaluation over the rounds, no fine-tuning" in out


def test_table_b_and_ablation(tmp_path, capsys):
    (tmp_path / "paper.md").write_text(PAPER)
    curve = [(float(e), 1.0) for e in range(21)]
    runs = [fake_run(tmp_path, "b", "mhmd", 10, 0.1, 10, curve=curve),
            fake_run(tmp_path, "a", "mhmd_no_scaler", 10, 0.1, 10, curve=curve[:6])]
    assert table.main([*map(str, runs), "--paper", str(tmp_path / "paper.md")]) == 0
    out = capsys.readouterr().out
    row_b = next(ln for ln in out.splitlines() if ln.startswith("| 10 | MHMD |"))
    cells = [c.strip() for c in row_b.strip("|").split("|")][2:]
    assert cells[0] == "0.00±1.00 (21.78±7.90)" and cells[6] == "10.00±1.00 (68.14±6.49)"
    assert cells[8] == "20.00±1.00 (68.72±6.46)"
    ablation = out.split("Ablation table")[1]
    assert "mhmd_no_scaler [2]" in ablation and "5.00±1.00" in ablation
    assert "Table A" in out and "mhmd_no_scaler" not in out.split("Table B")[0]  # ablations only in their table


def test_no_runs_is_one_line_error(tmp_path, capsys):
    assert table.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def backbone_run(root, name, model, dataset, s, f, tau, curve, best, algorithm="mhmd"):
    run = fake_run(root, name, algorithm, s, f, tau, curve=curve, best=best)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] = {"name": model, "options": {"head_layout": "historic"}}
    cfg["data"]["dataset"] = dataset
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_table16_and_tables12_13_from_their_runs_only(tmp_path, capsys):
    (tmp_path / "paper.md").write_text(PAPER)
    curve = [(float(e), 0.5) for e in range(6)]
    runs = [backbone_run(tmp_path, "r18", "resnet18", "cifar100", 100, 0.1, 1, curve, (40.0, 4.0)),
            backbone_run(tmp_path, "r50", "resnet50", "cifar100", 100, 0.1, 1, [(v + 1, d) for v, d in curve],
                         (41.0, 4.1)),
            backbone_run(tmp_path, "c1", "cnn4", "cifar10", 2, 1.0, 10, curve, (70.0, 7.0)),
            backbone_run(tmp_path, "c2", "cnn4", "cifar10", 2, 1.0, 10, [(v + 2, d) for v, d in curve], (72.0, 7.0)),
            fake_run(tmp_path, "main", "mhmd", 100, 0.1, 1, curve=[(50.0, 5.0)] * 6)]
    assert table.main([*map(str, runs), "--paper", str(tmp_path / "paper.md")]) == 0
    out = capsys.readouterr().out
    t16 = out.split("Table 16")[1].split("Tables 12")[0]
    header = next(ln for ln in t16.splitlines() if ln.startswith("| s |"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == ["MHMD ResNet-18 FL", "MHMD ResNet-18 FT",
                                                                    "MHMD ResNet-50 FL", "MHMD ResNet-50 FT"]
    row = next(ln for ln in t16.splitlines() if ln.startswith("| 100 | 0.1 | 1 |"))
    assert [c.strip() for c in row.strip("|").split("|")][3:] == ["40.00±4.00", "5.00±0.50", "41.00±4.10", "6.00±0.50"]
    t12 = out.split("Tables 12")[1]
    row = next(ln for ln in t12.splitlines() if ln.startswith("| 2 | 1 | 10 |"))
    assert [c.strip() for c in row.strip("|").split("|")][3:] == ["71.00±7.00 (n=2)", "6.00±0.50 (n=2)"]
    # Table A holds the MobileNet run only: its cell, not pooled with the ResNets' (50 = the main run alone)
    table_a = out.split("Table B")[0] if "Table B" in out else out.split("Table 16")[0]
    row = next(ln for ln in table_a.splitlines() if ln.startswith("| 100 | 0.1 | 1 |"))
    assert "50.00±5.00 (61.87±5.12)" in row and "n=" not in row
    for which, needle in (("16", "Table 16"), ("12_13", "Tables 12")):
        assert table.main([*map(str, runs), "--table", which]) == 0
        text = capsys.readouterr().out
        assert text.startswith(needle) and "Table A" not in text


def test_only_runs_of_one_experiment_are_pooled_and_the_difference_is_named(tmp_path, capsys):
    """Seeds pool (name, run_dir, tracking differ too); another lr or dataset in the same cell is shown apart."""
    curve = [(float(e), 0.5) for e in range(6)]
    same = [fake_run(tmp_path, "m1", "mhmd", 100, 0.1, 1, curve=curve, seed=1),
            fake_run(tmp_path, "m2", "mhmd", 100, 0.1, 1, curve=[(v + 2, d) for v, d in curve], seed=2)]
    other_lr = fake_run(tmp_path, "m3", "mhmd", 100, 0.1, 1, curve=[(v + 10, d) for v, d in curve], lr=0.05)
    other_data = fake_run(tmp_path, "m4", "mhmd", 100, 0.1, 1, curve=curve, data__dataset="cifar10")
    assert table.main([*map(str, same), "--table", "A", "--paper", str(tmp_path / "none.md")]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 100 |"))
    assert "6.00±0.50 (n=2)" in row and "{a}" not in row
    assert table.main([*map(str, same + [other_lr, other_data]), "--table", "A",
                       "--paper", str(tmp_path / "none.md")]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("| 100 |"))
    assert "6.00±0.50 (n=2) {a} / 15.00±0.50 {b} / 5.00±0.50 {c}" in row
    note = next(ln for ln in out.splitlines() if ln.startswith("- s=100"))
    assert "s=100 f=0.1 τ=1 MHMD: 3 different experiments" in note
    assert "{a} data.dataset='cifar100', federation.lr=0.1" in note and "federation.lr=0.05" in note
    assert str(other_lr) in note and "seed=" not in note and "run_dir=" not in note and "name=" not in note


def test_table_b_splits_rows_by_experiment(tmp_path, capsys):
    curve = [(float(e), 1.0) for e in range(21)]
    runs = [fake_run(tmp_path, "b20", "mhmd", 10, 0.1, 10, curve=curve, personalization__epochs=20),
            fake_run(tmp_path, "b5", "mhmd", 10, 0.1, 10, curve=curve[:6], personalization__epochs=5)]
    assert table.main([*map(str, runs), "--table", "B", "--paper", str(tmp_path / "none.md")]) == 0
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 10 | MHMD")]
    assert [r.split("|")[2].strip() for r in rows] == ["MHMD {a}", "MHMD {b}"]
    assert "personalization.epochs=20" in out and "personalization.epochs=5" in out


def test_damaged_run_directories_get_one_line(tmp_path, capsys):
    good = fake_run(tmp_path, "good", "mhmd", 100, 0.1, 1, curve=[(1.0, 0.5)] * 6)
    corrupt = fake_run(tmp_path, "corrupt", "mhmd", 100, 0.1, 1)
    (corrupt / "results.json").write_text('{"personalized": ')
    no_section = fake_run(tmp_path, "nosection", "mhmd", 100, 0.1, 1)
    cfg = yaml.safe_load((no_section / "config.yaml").read_text())
    del cfg["federation"]
    (no_section / "config.yaml").write_text(yaml.safe_dump(cfg))
    bad_yaml = fake_run(tmp_path, "badyaml", "mhmd", 100, 0.1, 1)
    (bad_yaml / "config.yaml").write_text("data: [1\n")
    for run, needle in ((corrupt, "results.json is damaged"), (no_section, "has no federation.client_fraction"),
                        (bad_yaml, "config.yaml is not valid YAML")):
        assert table.main([str(good), str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and str(run) in err, err


def test_runs_without_personalisation_are_not_called_missing(tmp_path, capsys):
    run = fake_run(tmp_path, "r", "fedrep", 100, 0.1, 1, best=(30.0, 3.0))
    assert table.main([str(run), "--paper", str(tmp_path / "none.md")]) == 0  # Table A: its best evaluation
    assert "30.00±3.00" in capsys.readouterr().out
    assert table.main([str(run), "--table", "B"]) == 2
    err = capsys.readouterr().err
    assert "no finished runs" not in err and "1 finished runs" in err and "1 without personalisation" in err

"""configs/paper/: the committed files are what generate.py writes, and they load and validate (Tables A, B, the
ablations, Table 16 and Tables 12/13)."""
from __future__ import annotations

import importlib.util

import pytest

from fed_fixtures import REPO
from orchestrator.config import load_config

PAPER = REPO / "configs" / "paper"


def _generate_module():
    spec = importlib.util.spec_from_file_location("paper_generate", PAPER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_configs_are_the_generated_ones(tmp_path):
    _generate_module().main(tmp_path)
    generated = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.yaml")}
    committed = {p.relative_to(PAPER): p.read_text() for p in PAPER.rglob("*.yaml")}
    assert generated.keys() == committed.keys()  # nothing stale, nothing missing: rerun generate.py
    assert [k for k in generated if generated[k] != committed[k]] == []


def test_table16_and_table12_13_grids():
    t16 = sorted(p.relative_to(PAPER / "table16").as_posix() for p in (PAPER / "table16").rglob("*.yaml"))
    assert t16 == sorted(f"{m}/s{s}_f0.1_tau{tau}.yaml" for m in ("resnet18", "resnet50") for s in (100, 50, 10)
                         for tau in (1, 4, 10))
    t12 = sorted(p.name for p in (PAPER / "table12_13" / "mhmd").glob("*.yaml"))
    assert t12 == sorted(f"s{s}_f{f}_tau{tau}.yaml" for s in (10, 5, 2) for f in ("0.1", "1") for tau in (1, 4, 10))


# every Table 16 / 12-13 config, and one config of every other directory (loading all ~260 takes ~15 s)
NEW = sorted([*(PAPER / "table16").rglob("*.yaml"), *(PAPER / "table12_13").rglob("*.yaml")])
ONE_PER_DIR = sorted({p.parent: p for p in PAPER.rglob("*.yaml")
                      if "table16" not in p.parts and "table12_13" not in p.parts}.values())


@pytest.mark.parametrize("path", NEW + ONE_PER_DIR, ids=lambda p: p.relative_to(PAPER).as_posix())
def test_paper_config_loads(path):
    cfg = load_config(path)
    rounds = {1: 320, 4: 80, 10: 32}[cfg.federation.local_epochs]
    if "table16" in path.parts or "table12_13" in path.parts:
        assert cfg.algorithm.name == "mhmd" and cfg.model.options == {"head_layout": "historic"}
        assert cfg.federation.rounds == rounds and cfg.federation.eval_every == 8
        p = cfg.personalization
        assert p.enabled and (p.epochs, p.lr, p.part, p.loss) == (5, 0.001, "full", "mhmd")
    if "table16" in path.parts:
        assert cfg.model.name == path.parent.name and cfg.data.dataset == "cifar100"
        assert cfg.federation.client_fraction == 0.1
    if "table12_13" in path.parts:
        assert cfg.model.name == "cnn4" and cfg.data.dataset == "cifar10"
        assert cfg.data.shards_per_client in (10, 5, 2)


@pytest.mark.parametrize("cell", ["table12_13/mhmd/s2_f0.1_tau1.yaml", "table16/resnet50/s10_f0.1_tau1.yaml"])
def test_backbone_config_runs_end_to_end_on_a_tiny_federation(tmp_path, cell):
    """The paper config itself (historic heads, MHMD, fine-tuning), shrunk to synthetic data and one round."""
    from orchestrator.runner import run

    cfg = load_config(PAPER / cell, [
        "--run_dir", str(tmp_path / "run"), "--tracking.progress", "false", "--tracking.wandb", "disabled",
        "--tracking.plots", "false", "--data.dataset", "synthetic", "--data.num_clients", "2",
        "--data.shards_per_client", "1", "--data.synthetic",
        "{num_classes: 2, train_per_class: 2, test_per_class: 1, image_size: 16}", "--federation.rounds", "1",
        "--federation.batch_size", "2", "--federation.client_fraction", "0.5", "--personalization.epochs", "1",
        "--checkpoint.every", "0"])
    results = run(cfg)
    assert results["personalized"]["acc_mean"] and len(results["personalized"]["acc_mean"]) == 2
    assert 0 <= results["global_best"]["acc_final"] <= 100

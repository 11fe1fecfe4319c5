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


def test_resnet_loss_modes_10050_and_10051():
    """The reference's ResNet-50 modes as fl-sd options: 10051 = mhmd with the model's defaults (aux 1, KD 1, scaler
    on), 10050 = the same without the scaler (loss option or the mhmd_no_scaler ablation); ResNet-18: aux 0.01, KD 0.1,
    scaler off. Fine-tuning uses the same loss (the reference forces its training mode)."""
    from orchestrator.algorithms import get_algorithm
    from orchestrator.build import loss_configs

    def losses(cell, *overrides):
        cfg = load_config(PAPER / cell, list(overrides))
        return loss_configs(cfg, get_algorithm(cfg.algorithm.name)(cfg.algorithm_options()))

    def key(c):
        return c.aux_weight, c.kd_weight, c.use_scaler, c.direction, c.gating, c.final_weight

    train, finetune = losses("table16/resnet50/s100_f0.1_tau1.yaml")
    assert key(train) == key(finetune) == (1.0, 1.0, True, "mutual", "correct", 1.0)  # 10051
    off, off_ft = losses("table16/resnet50/s100_f0.1_tau1.yaml", "--algorithm.loss_options.use_scaler", "false")
    assert key(off) == key(off_ft) == (1.0, 1.0, False, "mutual", "correct", 1.0)  # 10050
    ablation, _ = losses("table16/resnet50/s100_f0.1_tau1.yaml", "--algorithm.name", "mhmd_no_scaler")
    assert key(ablation) == key(off)
    r18, r18_ft = losses("table16/resnet18/s100_f0.1_tau1.yaml")
    assert key(r18) == key(r18_ft) == (0.01, 0.1, False, "mutual", "correct", 1.0)
    cnn, _ = losses("table12_13/mhmd/s2_f0.1_tau1.yaml")
    assert key(cnn) == (0.01, 1.0, True, "mutual", "correct", 1.0)

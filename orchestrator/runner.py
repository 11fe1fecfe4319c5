"""Run a federation from a Config: run directory, checkpoints, tracking, resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from fl_sd.data import Partition

from .backends import make_backend
from .checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, save_checkpoint
from .config import Config, config_from_dict
from .federation import Federation
from .tracking import Tracker

CONFIG_FILE, PARTITION_FILE, RESULTS_FILE = "config.yaml", "partition.npz", "results.json"


class RunDirError(ValueError):
    """An unusable run directory."""


def resolve_run_dir(cfg: Config) -> Path:
    if cfg.name is None:
        cfg.name = cfg.default_name()
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def prepare_new_run_dir(run_dir: Path) -> None:
    if (run_dir / CHECKPOINT).exists() or (run_dir / RESULTS_FILE).exists():
        raise RunDirError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir}, "
                          "or set run_dir/name to a new directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write run directory {run_dir} ({err.strerror}); choose a writable run_dir") from None


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    if not path.exists():
        raise RunDirError(f"--resume {run_dir}: not an fl-sd run directory (no {CONFIG_FILE}); pass the directory "
                          "a run was started in")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{path} is not valid YAML ({err.__class__.__name__})") from None
    cfg = config_from_dict(data)
    cfg.run_dir = str(run_dir)
    return cfg


def checkpoint_meta(fed: Federation) -> dict[str, Any]:
    cfg = fed.cfg
    return {"model": cfg.model.name, "num_classes": fed.module.net.num_classes, "algorithm": cfg.algorithm.name,
            "num_clients": cfg.data.num_clients, "seed": cfg.seed}


def run(cfg: Config, resume: str | os.PathLike | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train, evaluate and personalise; return the results dict (also written to results.json).

    ``stop_after`` ends the run after that many rounds in total (used by tests to simulate an interruption).
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = load_run_config(run_dir)
        if not (run_dir / PARTITION_FILE).exists():
            raise RunDirError(f"--resume {run_dir}: {PARTITION_FILE} is missing; the run directory is incomplete")
        partition = Partition.load(run_dir / PARTITION_FILE)
    else:
        run_dir = resolve_run_dir(cfg)
        prepare_new_run_dir(run_dir)
        partition = None
    fed = Federation(cfg, run_dir, partition=partition)
    if resume is not None:
        if (run_dir / CHECKPOINT).exists():
            try:
                fed.load_state_dict(load_checkpoint(run_dir, checkpoint_meta(fed)))
            except (KeyError, TypeError) as err:
                raise CheckpointError(f"checkpoint in {run_dir} is incomplete ({err}); start the run again") from None
    else:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        fed.partition.save(run_dir / PARTITION_FILE)

    f = cfg.federation
    tracker = Tracker(cfg, run_dir, f.rounds, fed.round)
    backend = make_backend(cfg.backend, fed)
    meta = checkpoint_meta(fed)
    try:
        if fed.round == 0:
            tracker.message(f"run {cfg.name}: {cfg.algorithm.name}, {cfg.model.name} on {cfg.data.dataset}, "
                            f"{cfg.data.num_clients} clients ({cfg.clients_per_round}/round), {f.rounds} rounds, "
                            f"device {fed.device}; run directory {run_dir}")
        else:
            tracker.message(f"resuming {run_dir} after round {fed.round}")
        while fed.round < f.rounds:
            if stop_after is not None and fed.round >= stop_after:
                return {}
            record = fed.run_round(backend)
            tracker.log_round(record, fed.round_log)
            if fed.round % f.eval_every == 0 or fed.round == f.rounds:
                tracker.log_eval(fed.evaluate(), fed.history)
            every = cfg.checkpoint.every
            if (every and fed.round % every == 0) or fed.round == f.rounds:
                save_checkpoint(run_dir, fed.state_dict(), meta)
        if cfg.personalization.enabled and fed.personalization is None:
            if cfg.federation.select == "best":
                tracker.message(f"personalising from the best-on-test model (round {fed.best['round']}, "
                                f"{fed.best['acc']:.2f}%): the paper's protocol selects on the test set")
            tracker.log_personalization(fed.personalize())
            save_checkpoint(run_dir, fed.state_dict(), meta)
        results = fed.results()
        tracker.finish(results)
        return results
    finally:
        backend.close()
        tracker.close()

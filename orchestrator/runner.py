"""Run a federation from a Config: run directory, checkpoints, tracking, resume."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from fl_sd.data import Partition

from .backends import make_backend
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, load_run_config
from .errors import CheckpointError, RunDirError
from .federation import Federation
from .rundir import CHECKPOINT_FILE, CONFIG_FILE, PARTITION_FILE, prepare_new_run_dir, resolve_run_dir
from .tracking import Tracker


def checkpoint_meta(fed: Federation) -> dict[str, Any]:
    cfg = fed.cfg
    return {"model": cfg.model.name, "num_classes": fed.runtime.net.num_classes, "algorithm": cfg.algorithm.name,
            "num_clients": cfg.data.num_clients, "seed": cfg.seed}


def run(cfg: Config | None, resume: str | os.PathLike | None = None, stop_after: int | None = None,
        backend_factory: Callable | None = None) -> dict[str, Any]:
    """Train, evaluate and personalise; return the results dict (also written to results.json).

    ``stop_after`` ends the run after that many rounds in total (used by tests to simulate an interruption).
    ``backend_factory(cfg, run_dir, runtime, algorithm)`` replaces the configured backend (the deployment ServerApp
    passes one that talks to Flower's Grid).
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
    meta = checkpoint_meta(fed)
    if resume is not None:
        if (run_dir / CHECKPOINT_FILE).exists():
            try:
                fed.load_state_dict(load_checkpoint(run_dir, meta))
            except (KeyError, TypeError) as err:
                raise CheckpointError(f"checkpoint in {run_dir} is incomplete ({err}); start the run again") from None
    else:
        (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        fed.partition.save(run_dir / PARTITION_FILE)

    f = cfg.federation
    server = fed.server
    tracker = Tracker(cfg, run_dir, f.rounds, server.round)
    if backend_factory is None:
        backend = make_backend(cfg.backend, cfg, run_dir, fed.runtime, fed.algorithm)
    else:
        backend = backend_factory(cfg, run_dir, fed.runtime, fed.algorithm)
    try:
        if server.round == 0:
            tracker.message(f"run {cfg.name}: {cfg.algorithm.name}, {cfg.model.name} on {cfg.data.dataset}, "
                            f"{cfg.data.num_clients} clients ({cfg.clients_per_round}/round), {f.rounds} rounds, "
                            f"device {fed.device}; run directory {run_dir}")
        else:
            tracker.message(f"resuming {run_dir} after round {server.round}")
        while server.round < f.rounds:
            if stop_after is not None and server.round >= stop_after:
                return {}
            record = fed.run_round(backend)
            tracker.log_round(record, server.round_log)
            if server.round % f.eval_every == 0 or server.round == f.rounds:
                tracker.log_eval(fed.evaluate(), server.history)
            every = cfg.checkpoint.every
            if (every and server.round % every == 0) or server.round == f.rounds:
                save_checkpoint(run_dir, fed.state_dict(), meta)
        if cfg.personalization.enabled and server.personalization is None:
            if f.select == "best":
                tracker.message(f"personalising from the best-on-test model (round {server.best['round']}, "
                                f"{server.best['acc']:.2f}%): the paper's protocol selects on the test set")
            tracker.log_personalization(fed.personalize())
            save_checkpoint(run_dir, fed.state_dict(), meta)
        results = fed.results()
        tracker.finish(results)
        return results
    finally:
        backend.close()
        tracker.close()

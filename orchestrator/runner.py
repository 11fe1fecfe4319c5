"""Run a federation from a Config: run directory (locked while running), checkpoints, tracking, resume, signals."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable

from fl_sd.data import Partition
from fl_sd.io import atomic_write_text

from .backends import check_backend, make_backend
from .checkpoint import check_meta, read_checkpoint, save_checkpoint
from .config import Config, load_run_config
from .errors import CheckpointError, RunDirError, RunInterrupted
from .federation import Federation
from .fingerprint import differences, resume_differences, summary
from .rundir import (CHECKPOINT_FILE, CONFIG_FILE, PARTITION_FILE, RunDirLock, create_run_dir, holds_run,
                     read_run_config, remove_failed_start, resolve_run_dir)
from .tracking import Tracker, wandb_mode


def checkpoint_meta(fed: Federation) -> dict[str, Any]:
    """The run's identity stored with every checkpoint; ``config`` is the resolved config --resume compares with."""
    cfg = fed.cfg
    return {"model": cfg.model.name, "num_classes": fed.runtime.net.num_classes, "algorithm": cfg.algorithm.name,
            "num_clients": cfg.data.num_clients, "seed": cfg.seed, "config": cfg.to_dict()}


class StopSignals:
    """SIGTERM (what a cluster scheduler sends) asks the round loop to stop after the current round, checkpoint and
    exit; a second SIGTERM, or one during personalisation, stops at once. Ctrl-C stops at once. Installed only in
    the main thread; the previous handlers are restored on exit."""

    def __init__(self):
        self.requested: str | None = None
        #: stop at once (no round to finish): until the round loop starts (e.g. while a Flower backend starts,
        #: which can wait minutes) and during personalisation
        self.immediate = True
        self._previous = None

    def _on_term(self, signum, frame):
        if self.requested or self.immediate:
            raise RunInterrupted("SIGTERM", None, -1, False)
        self.requested = "SIGTERM"

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def run(cfg: Config | None, resume: str | os.PathLike | None = None, stop_after: int | None = None,
        backend_factory: Callable | None = None) -> dict[str, Any]:
    """Train, evaluate and personalise; return the results dict (also written to results.json).

    ``stop_after`` ends the run after that many rounds in total (used by tests to simulate an interruption).
    ``backend_factory(cfg, run_dir, runtime, algorithm)`` replaces the configured backend (the deployment ServerApp
    passes one that talks to Flower's Grid).
    """
    with StopSignals() as stop:  # from the start: a SIGTERM while the data loads also ends with one line
        return _run(cfg, resume, stop_after, backend_factory, stop)


def _run(cfg: Config | None, resume, stop_after: int | None, backend_factory: Callable | None,
         stop: StopSignals) -> dict[str, Any]:
    if resume is not None:
        run_dir = Path(resume)
        read_run_config(run_dir)  # a clear line for a missing / non-run directory before anything else
        lock = RunDirLock(run_dir).acquire()
        try:
            cfg, fed, meta = _reopen(run_dir)
            check_backend(cfg)
        except RunInterrupted as err:
            lock.release()
            raise RunInterrupted(err.signal_name, run_dir, -1, False) from None
        except BaseException:
            lock.release()
            raise
    else:
        check_backend(cfg)  # e.g. an unreachable Ray address: before a run directory exists
        run_dir = resolve_run_dir(cfg)
        created = create_run_dir(run_dir)
        lock = RunDirLock(run_dir).acquire()
        try:
            if holds_run(run_dir):
                raise RunDirError(_existing_run_message(run_dir, cfg))
            cfg.make_paths_absolute()
            cfg.tracking.wandb = wandb_mode(cfg.tracking.wandb)  # stored resolved: a resume tracks as the start did
            run_dir = Path(cfg.run_dir)
            fed = Federation(cfg, run_dir)
            meta = checkpoint_meta(fed)
            fed.partition.save(run_dir / PARTITION_FILE)
            atomic_write_text(run_dir / CONFIG_FILE, cfg.to_yaml())  # last: its presence marks a started run
        except BaseException:
            lock.release()
            remove_failed_start(run_dir, created)
            raise
    try:
        return _drive(cfg, fed, meta, run_dir, stop, stop_after, backend_factory)
    except KeyboardInterrupt:
        raise RunInterrupted("Ctrl-C", run_dir, fed.server.round, False) from None
    except RunInterrupted as err:
        raise RunInterrupted(err.signal_name, run_dir, err.round if err.round >= 0 else fed.server.round,
                             err.checkpointed) from None
    finally:
        lock.release()


def _existing_run_message(run_dir: Path, cfg: Config) -> str:
    try:
        diffs = differences(read_run_config(run_dir), cfg.absolute().to_dict())
    except RunDirError:
        diffs = ["its config.yaml is unreadable"]
    if not diffs:
        return (f"run directory {run_dir} already holds this run; continue it with --resume {run_dir}, or set "
                "name/run_dir to a new directory")
    return (f"run directory {run_dir} already holds a different experiment ({summary(diffs)}); set name or run_dir "
            "to a new directory (do not --resume it: that continues the other experiment)")


def _reopen(run_dir: Path) -> tuple[Config, Federation, dict[str, Any]]:
    """The config, federation (at its checkpoint) and checkpoint meta of the run in ``run_dir``."""
    cfg = load_run_config(run_dir)
    if not (run_dir / PARTITION_FILE).exists():
        raise RunDirError(f"--resume {run_dir}: {PARTITION_FILE} is missing; the run directory is incomplete")
    saved = read_checkpoint(run_dir) if (run_dir / CHECKPOINT_FILE).exists() else None
    if saved is not None and "config" in saved["meta"]:
        diffs = resume_differences(saved["meta"]["config"], cfg.to_dict(), saved["state"].get("round", 0),
                                   Config().to_dict())
        if diffs:
            raise CheckpointError(f"--resume {run_dir}: config.yaml was edited in a way that changes the run "
                                  f"({summary(diffs)}); undo the edit, or start a new run (README: what a resume "
                                  "may change)")
    fed = Federation(cfg, run_dir, partition=Partition.load(run_dir / PARTITION_FILE))
    meta = checkpoint_meta(fed)
    if saved is not None:
        check_meta(run_dir, saved["meta"], meta)
        try:
            fed.load_state_dict(saved["state"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"checkpoint in {run_dir} is incomplete ({err}); start the run again") from None
        except ValueError as err:
            raise CheckpointError(f"checkpoint in {run_dir}: {err}; resume with the run's own config.yaml") from None
    return cfg, fed, meta


def _drive(cfg: Config, fed: Federation, meta: dict[str, Any], run_dir: Path, stop: StopSignals,
           stop_after: int | None, backend_factory: Callable | None = None) -> dict[str, Any]:
    f = cfg.federation
    server = fed.server
    if server.round < f.rounds and server.personalization is not None:
        server.personalization = None  # more rounds were asked for: personalise the new model again
    tracker = Tracker(cfg, run_dir, f.rounds, server.round)
    backend = None
    try:
        if backend_factory is None:
            backend = make_backend(cfg.backend, cfg, run_dir, fed.runtime, fed.algorithm)
        else:
            backend = backend_factory(cfg, run_dir, fed.runtime, fed.algorithm)
        if server.round == 0:
            tracker.message(f"run {cfg.name}: {cfg.algorithm.name}, {cfg.model.name} on {cfg.data.dataset}, "
                            f"{cfg.data.num_clients} clients ({cfg.clients_per_round}/round), {f.rounds} rounds, "
                            f"device {fed.device}; run directory {run_dir}")
        else:
            tracker.message(f"resuming {run_dir} after round {server.round}")
        tracker.replay(server.round_log, server.history)
        stop.immediate = False  # from here a SIGTERM lets the round finish and checkpoints it
        if stop.requested:  # asked for before the loop could honour it
            raise RunInterrupted(stop.requested, run_dir, server.round, False)
        while server.round < f.rounds:
            if stop_after is not None and server.round >= stop_after:
                return {}
            record = fed.run_round(backend)
            evaluation = None
            if server.round % f.eval_every == 0 or server.round == f.rounds:
                evaluation = fed.evaluate()
                tracker.write_evaluations(server.history)
            tracker.log_round(record, server.round_log, evaluation)
            every = cfg.checkpoint.every
            if (every and server.round % every == 0) or server.round == f.rounds or stop.requested:
                save_checkpoint(run_dir, fed.state_dict(), meta)
            if stop.requested:
                raise RunInterrupted(stop.requested, run_dir, server.round, True)
        if cfg.personalization.enabled and server.personalization is None:
            if f.select == "best":
                tracker.message(f"personalising from the best-on-test model (round {server.best['round']}, "
                                f"{server.best['acc']:.2f}%): the paper's protocol selects on the test set")
            stop.immediate = True  # personalisation is not checkpointed midway
            tracker.log_personalization(fed.personalize(tracker.personalization_progress))
            save_checkpoint(run_dir, fed.state_dict(), meta)
        results = fed.results()
        tracker.finish(results)
        return results
    finally:
        if backend is not None:
            backend.close()
        tracker.close()

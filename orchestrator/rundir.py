"""The run directory: what a run writes where, and how a directory is started, found and reopened.

    runs/<name>/config.yaml         the resolved config (what --resume reads)
               partition.npz        the clients' train/test index sets
               checkpoint.pt        the whole federation's state (orchestrator.checkpoint)
               rounds.csv, evaluations.csv, personalization.csv, results.json, *.png, wandb/, wandb_id.txt,
               wandb_logged.txt
               .lock                the OS lock of the process that runs in it (see :class:`RunDirLock`)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import RunDirError

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

CONFIG_FILE = "config.yaml"
PARTITION_FILE = "partition.npz"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
ROUNDS_FILE = "rounds.csv"
EVALUATIONS_FILE = "evaluations.csv"
PERSONALIZATION_FILE = "personalization.csv"
WANDB_ID_FILE = "wandb_id.txt"
WANDB_LOGGED_FILE = "wandb_logged.txt"  # the last round W&B was sent
LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover  (not POSIX: no lock)
    fcntl = None


class RunDirLock:
    """An exclusive OS lock (``flock``) on a run directory, held while a process runs in it.

    The kernel drops it when the process exits, however it exits (also ``kill -9``), so a stale ``.lock`` file never
    blocks a later run or ``--resume``; a second process on a locked directory gets a :class:`RunDirError` naming
    the holder's pid. Use as a context manager, or ``acquire()`` / ``release()``.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self._fh = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def acquire(self) -> "RunDirLock":
        if fcntl is None or self._fh is not None:
            return self
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunDirError(f"run directory {self.run_dir} is in use by another fl-sd process (pid {holder}); wait "
                              "for it to finish (or stop it), or choose another run_dir/name") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the lock
            self._fh = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def resolve_run_dir(cfg: "Config") -> Path:
    """``cfg.run_dir``, else ``runs/<name>`` (the name derived from the config when unset; written back to cfg)."""
    if cfg.name is None:
        cfg.name = cfg.default_name()
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (CONFIG_FILE, CHECKPOINT_FILE, RESULTS_FILE))


def create_run_dir(run_dir: Path) -> bool:
    """Create ``run_dir`` (and its parents) if missing; True if this call created it. RunDirError if unwritable."""
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write run directory {run_dir} ({err.strerror}); choose a writable run_dir") from None
    return created


def remove_failed_start(run_dir: Path, created: bool) -> None:
    """After a start that failed before the run's config was written: remove what it left (the directory itself if
    this start created it), so a failed start leaves no empty run directory behind. In a directory that existed the
    ``.lock`` file stays: removing a lock file another process may have opened would let two processes hold it."""
    if holds_run(run_dir):
        return
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        (run_dir / PARTITION_FILE).unlink(missing_ok=True)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The raw config a run was started with (its ``config.yaml``); ``orchestrator.config.load_run_config`` types it."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise RunDirError(f"--resume {run_dir}: no such directory")
    if not path.exists():
        raise RunDirError(f"--resume {run_dir}: not an fl-sd run directory (no {CONFIG_FILE}); pass the directory "
                          "a run was started in")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RunDirError(f"{path} is not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} does not hold a config mapping; the run directory is damaged")
    return data


def read_finished_run(run_dir: Path, required: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, results) of a finished run (its ``config.yaml`` and ``results.json``); None when ``run_dir`` holds no
    ``results.json`` (not a run, or not finished). A damaged file, or a config without one of the ``required`` dotted
    keys (``"data.partition"``), is a RunDirError naming the file."""
    run_dir = Path(run_dir)
    res_path = run_dir / RESULTS_FILE
    if not res_path.exists():
        return None
    try:
        results = json.loads(res_path.read_text())
    except (ValueError, OSError) as err:
        raise RunDirError(f"{res_path} is damaged ({type(err).__name__}: {' '.join(str(err).split())}); re-run "
                          "the run (fl-sd --resume keeps its checkpoint) or leave the directory out") from None
    if not isinstance(results, dict):
        raise RunDirError(f"{res_path} holds a {type(results).__name__}, not fl-sd results; leave the directory out")
    if not (run_dir / CONFIG_FILE).exists():
        raise RunDirError(f"{run_dir} has {RESULTS_FILE} but no {CONFIG_FILE}; it is not a complete fl-sd run "
                          "directory: leave it out")
    try:
        config = read_run_config(run_dir)
    except RunDirError as err:
        raise RunDirError(str(err).replace("--resume ", "")) from None
    for key in required:
        node: Any = config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise RunDirError(f"{run_dir / CONFIG_FILE} has no {key}; it is not a complete fl-sd run config "
                                  "(written by another tool or edited): restore it or leave the directory out")
            node = node[part]
    return config, results

"""Sweeps: a grid of runs (algorithms x config cells x seeds) from one small YAML, several processes at once.

    fl-sd-sweep sweep.yaml [--workers 2]          # or: python -m orchestrator.sweep sweep.yaml

    out: runs/my-sweep              # run directories: <out>/<cell>/<algorithm>/s<seed>
    seeds: [1, 2, 3, 4, 5]
    workers: 2                      # runs at once, one process each (default 1)
    threads: 1                      # OMP_NUM_THREADS of every run (default: inherited)
    baseline: mhmd                  # the comparison's baseline (fl-sd-compare, printed at the end)
    args: {tracking.wandb: offline} # dotted overrides of every run
    algorithms:                     # registered names, or label: {name: ..., args: {...}}
      - mhmd
      - mhmd_aux
      - mhmd_aux_detached: {name: mhmd_aux, args: {algorithm.loss_options.detach_teacher: true}}
    cells:                          # cell name: a config file and its overrides
      c10_s2: {config: configs/cifar10_mini.yaml}
      c10_s5: {config: configs/cifar10_mini.yaml, args: {data.shards_per_client: 5}}

Every run is an ordinary ``fl-sd`` process (``orchestrator/main.py``), its output in ``<run dir>/sweep.log``. A run
whose directory holds ``results.json`` is skipped; one that was interrupted continues with ``--resume`` (from its last
checkpoint: the same numbers as an uninterrupted run); a directory that holds a run of another config stops the sweep
before anything starts. Every run's config is validated first, so a typo in the grid costs nothing. One status line
(done / running with their rounds / failed) is printed whenever something changes, and every ``--status-every``
seconds. Ctrl-C (or SIGTERM) interrupts every running run at its next round; run the same command again to continue.

Runs of a sweep are grouped for W&B: ``tracking.group`` = ``<out name>/<cell>``, ``tracking.job_type`` = the
algorithm's label. Several runs share one GPU when ``workers`` > 1 (each process puts its data and model on the
device; size ``workers`` to the GPU's memory); a run on a Ray cluster is ``args: {backend: flower}`` (docs/flower.md).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import parse_args
from .errors import ConfigError, SweepError
from .fingerprint import differences, summary
from .rundir import CONFIG_FILE, PARTITION_FILE, RESULTS_FILE, ROUNDS_FILE

MAIN = Path(__file__).with_name("main.py")
#: what a sweep writes into each run directory: which cell, algorithm label and seed the run is
SWEEP_RUN_FILE = "sweep_run.json"
LOG_FILE = "sweep.log"
LOCK_FILE = ".sweep.lock"
#: the keys a sweep YAML may hold (any other key is refused as a typo before anything runs)
SPEC_KEYS = {"out", "seeds", "workers", "threads", "baseline", "args", "algorithms", "cells"}


@dataclass(frozen=True)
class Job:
    cell: str
    label: str
    seed: int
    run_dir: Path
    args: tuple[str, ...]  #: the fl-sd command line (without the program)


@dataclass
class Spec:
    out: Path
    seeds: list[int]
    algorithms: dict[str, tuple[str, dict[str, Any]]]  #: label -> (algorithm name, overrides)
    cells: dict[str, tuple[str, dict[str, Any]]]  #: cell -> (config file, overrides)
    args: dict[str, Any] = field(default_factory=dict)
    workers: int = 1
    threads: int | None = None
    baseline: str | None = None


def cli_value(value: Any) -> str:
    """A YAML value as one command-line token (``{width: 16}``, ``true``, ``[0.5, 0.75]``)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").strip()


def _overrides(args: Any, where: str) -> dict[str, Any]:
    if args is None:
        return {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise SweepError(f"{where}: args must be a mapping of dotted config keys to values, e.g. "
                         "{federation.rounds: 10}")
    return dict(args)


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a sweep YAML (one-line :class:`SweepError` naming the problem)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path} must hold a mapping with out, seeds, algorithms and cells")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise SweepError(f"{path}: unknown key(s) {sorted(unknown)}; a sweep has {sorted(SPEC_KEYS)}")
    for key in ("out", "seeds", "algorithms", "cells"):
        if not data.get(key):
            raise SweepError(f"{path}: '{key}' is missing or empty")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    algorithms: dict[str, tuple[str, dict[str, Any]]] = {}
    entries = data["algorithms"] if isinstance(data["algorithms"], list) else [data["algorithms"]]
    for entry in entries:
        if isinstance(entry, str):
            label, name, args = entry, entry, {}
        elif isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())), dict):
            label, body = next(iter(entry.items()))
            name, args = body.get("name", label), _overrides(body.get("args"), f"{path}: algorithm {label}")
            if set(body) - {"name", "args"}:
                raise SweepError(f"{path}: algorithm {label} takes name and args, got {sorted(body)}")
        else:
            raise SweepError(f"{path}: an algorithm is a name or 'label: {{name: ..., args: {{...}}}}', got {entry!r}")
        if label in algorithms:
            raise SweepError(f"{path}: algorithm label {label!r} appears twice")
        algorithms[label] = (name, args)
    cells: dict[str, tuple[str, dict[str, Any]]] = {}
    if not isinstance(data["cells"], dict):
        raise SweepError(f"{path}: cells must map a cell name to {{config: FILE, args: {{...}}}}")
    for cell, body in data["cells"].items():
        if not isinstance(body, dict) or "config" not in body or set(body) - {"config", "args"}:
            raise SweepError(f"{path}: cell {cell} must be {{config: FILE, args: {{...}}}}, got {body!r}")
        cells[str(cell)] = (str(body["config"]), _overrides(body.get("args"), f"{path}: cell {cell}"))
    workers = data.get("workers", 1)
    threads = data.get("threads")
    if not isinstance(workers, int) or workers < 1:
        raise SweepError(f"{path}: workers must be an integer >= 1, got {workers!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise SweepError(f"{path}: threads must be an integer >= 1 or absent, got {threads!r}")
    baseline = data.get("baseline")
    if baseline is not None and baseline not in algorithms:
        raise SweepError(f"{path}: baseline {baseline!r} is not one of the algorithms {list(algorithms)}")
    return Spec(Path(data["out"]), seeds, algorithms, cells, _overrides(data.get("args"), f"{path}: args"),
                workers, threads, baseline)


def plan(spec: Spec) -> list[Job]:
    """Every run of the grid, seeds outermost (so a partial sweep has whole seeds of every cell)."""
    jobs = []
    for seed in spec.seeds:
        for cell, (config, cell_args) in spec.cells.items():
            for label, (name, alg_args) in spec.algorithms.items():
                run_dir = spec.out / cell / label / f"s{seed}"
                overrides = {**spec.args, **cell_args, **alg_args, "algorithm.name": name, "seed": seed,
                             "run_dir": str(run_dir), "name": f"{cell}-{label}-s{seed}",
                             "tracking.group": f"{spec.out.name}/{cell}", "tracking.job_type": label}
                overrides.setdefault("tracking.progress", False)
                args = ["--config", config]
                for key, value in overrides.items():
                    args += [f"--{key}", cli_value(value)]
                jobs.append(Job(cell, label, seed, run_dir, tuple(args)))
    return jobs


def check_jobs(jobs: list[Job]) -> dict[Job, str]:
    """Validate every job's config and classify it: ``done``, ``resume`` or ``new``. A run directory that holds a
    run of another config is an error (the sweep file changed: remove the directory or choose another ``out``)."""
    states = {}
    for job in jobs:
        try:
            wanted = parse_args(list(job.args))[0].absolute().to_dict()
        except ConfigError as err:
            raise SweepError(f"cell {job.cell}, algorithm {job.label}, seed {job.seed}: {err}") from None
        saved_path = job.run_dir / CONFIG_FILE
        if saved_path.exists():
            # the run's identity, as --resume judges it (paths are stored absolute; location keys do not count)
            diffs = differences(yaml.safe_load(saved_path.read_text()) or {}, wanted)
            if diffs:
                raise SweepError(f"{job.run_dir} holds a run of another config ({summary(diffs)}); remove "
                                 "it or set another 'out'")
        if (job.run_dir / RESULTS_FILE).exists():
            states[job] = "done"
        elif saved_path.exists() and (job.run_dir / PARTITION_FILE).exists():
            states[job] = "resume"
        else:
            states[job] = "new"
    return states


def _rounds_done(run_dir: Path) -> int:
    try:
        with (run_dir / ROUNDS_FILE).open() as fh:
            return max(0, sum(1 for _ in fh) - 1)
    except OSError:
        return 0


class _Lock:
    """One sweep per ``out`` at a time: ``<out>/.sweep.lock`` holds the sweep's pid (a dead owner's lock is taken)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                    os.kill(pid, 0)
                except (ValueError, ProcessLookupError, OSError):
                    self.path.unlink(missing_ok=True)  # stale: its sweep is gone
                    continue
                raise SweepError(f"another sweep (pid {pid}) is running in {self.path.parent}; wait for it or stop "
                                 "it") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise SweepError(f"cannot take {self.path}; remove it if no sweep is running")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run_sweep(spec: Spec, workers: int | None = None, status_every: float = 30.0,
              out: Callable[[str], None] = print, poll: float = 0.5) -> dict[str, int]:
    """Run every job that is not done, ``workers`` at a time; return the counts of done / failed / skipped runs."""
    workers = workers or spec.workers
    jobs = plan(spec)
    states = check_jobs(jobs)
    todo = [j for j in jobs if states[j] != "done"]
    counts = {"skipped": len(jobs) - len(todo), "done": 0, "failed": 0}
    env = dict(os.environ)
    if spec.threads is not None:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    running: dict[Job, tuple[subprocess.Popen, Any]] = {}
    started = time.monotonic()
    last_status = [0.0]

    def status(force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - last_status[0] < status_every:
            return
        last_status[0] = now
        active = ", ".join(f"{j.cell}/{j.label}/s{j.seed} r{_rounds_done(j.run_dir)}" for j in running)
        out(f"[sweep {spec.out}] {counts['done'] + counts['skipped']}/{len(jobs)} done, {len(running)} running"
            f"{' (' + active + ')' if active else ''}, {counts['failed']} failed, {len(todo)} waiting, "
            f"{(now - started) / 60:.1f} min")

    out(f"[sweep {spec.out}] {len(jobs)} runs: {counts['skipped']} done already, "
        f"{sum(s == 'resume' for s in states.values())} to resume, {sum(s == 'new' for s in states.values())} new; "
        f"{workers} at a time")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # SIGINT stops the sweep and its runs (below) also when the sweep was started with SIGINT ignored, as a shell
    # starts background jobs: without this the runs would inherit the ignored signal and never stop on it
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with _Lock(spec.out):
            for job in jobs:
                if states[job] == "done":
                    _write_sweep_run(job)
            while todo or running:
                while todo and len(running) < workers:
                    job = todo.pop(0)
                    job.run_dir.mkdir(parents=True, exist_ok=True)
                    _write_sweep_run(job)
                    resume = states[job] == "resume"
                    argv = ["--resume", str(job.run_dir)] if resume else list(job.args)
                    log = (job.run_dir / LOG_FILE).open("a")
                    proc = subprocess.Popen([sys.executable, str(MAIN), *argv], stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)
                    running[job] = (proc, log)
                    out(f"[sweep] {'resume' if resume else 'start '} {job.cell}/{job.label}/s{job.seed}")
                    status(force=True)
                for job, (proc, log) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    log.close()
                    del running[job]
                    if code == 0 and (job.run_dir / RESULTS_FILE).exists():
                        counts["done"] += 1
                        out(f"[sweep] done   {job.cell}/{job.label}/s{job.seed}")
                    else:
                        counts["failed"] += 1
                        out(f"[sweep] FAILED {job.cell}/{job.label}/s{job.seed} (exit {code}): "
                            f"{_last_line(job.run_dir / LOG_FILE)}")
                    status(force=True)
                status()
                time.sleep(poll)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.send_signal(signal.SIGINT)  # each run stops cleanly; its last checkpoint is intact
        for proc, log in running.values():
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        out(f"[sweep] interrupted: {len(running)} run(s) stopped; run the same command again to continue")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    status(force=True)
    return counts


def _write_sweep_run(job: Job) -> None:
    (job.run_dir / SWEEP_RUN_FILE).write_text(json.dumps({"cell": job.cell, "algorithm": job.label,
                                                          "seed": job.seed}))


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-sd-sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the sweep's YAML file")
    parser.add_argument("--workers", type=int, default=None, help="runs at once (default: the file's, else 1)")
    parser.add_argument("--status-every", type=float, default=30.0, help="seconds between status lines")
    parser.add_argument("--dry-run", action="store_true", help="check the grid and list what would run")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if args.workers is not None and args.workers < 1:
            raise SweepError(f"--workers must be >= 1, got {args.workers}")
        if args.dry_run:
            jobs = plan(spec)
            for job, state in check_jobs(jobs).items():
                print(f"{state:6s} {job.run_dir}")
            return 0
        counts = run_sweep(spec, args.workers, args.status_every)
    except SweepError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"compare them: fl-sd-compare {spec.out}" + (f" --baseline {spec.baseline}" if spec.baseline else ""))
    return 1 if counts["failed"] else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()

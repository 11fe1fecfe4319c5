"""Run tracking: local CSV/JSON files (always), Weights & Biases (optional, never fatal), a progress bar, plots."""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from fl_sd.io import atomic_write

from .plots import plot_run
from .rundir import (CHECKPOINT_FILE, EVALUATIONS_FILE, PERSONALIZATION_FILE, RESULTS_FILE, ROUNDS_FILE,
                     WANDB_ID_FILE, WANDB_LOGGED_FILE)
from .wandb_files import last_offline_step


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]

    def write(fh):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        fh.write(text.getvalue().encode())

    atomic_write(path, write)


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, default=_jsonable).encode()))


def _jsonable(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def wandb_mode(configured: str | None) -> str:
    mode = configured or os.environ.get("WANDB_MODE") or "disabled"
    if mode not in ("online", "offline", "disabled"):
        warnings.warn(f"WANDB_MODE={mode!r} is not online/offline/disabled; tracking disabled", stacklevel=2)
        return "disabled"
    return mode


def progress_enabled(configured: bool | None) -> bool:
    if configured is not None:
        return configured
    return sys.stderr.isatty() and not os.environ.get("CI")


class Tracker:
    """Writes rounds.csv / evaluations.csv / results.json in the run directory and mirrors them to W&B."""

    def __init__(self, cfg, run_dir: Path, total_rounds: int, start_round: int = 0):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.wandb = None
        self._progress = None
        self._task = None
        self._ptask = None
        self._latest = ""
        self.total_rounds = total_rounds
        self.wandb_mode = wandb_mode(cfg.tracking.wandb)
        #: the last round whose records reached W&B (kept in wandb_logged.txt: a resumed run replays the rest)
        self._wandb_logged = 0
        #: the W&B run id when it runs offline (close() waits for its files)
        self._wandb_offline_id: str | None = None
        if self.wandb_mode != "disabled":
            self._start_wandb(self.wandb_mode)
        if progress_enabled(cfg.tracking.progress):
            self._start_progress(total_rounds, start_round)

    # -- W&B --------------------------------------------------------------------------------------------------
    def _start_wandb(self, mode: str) -> None:
        id_file = self.run_dir / WANDB_ID_FILE
        try:
            import wandb

            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            t = self.cfg.tracking
            self.wandb = wandb.init(
                project=t.project, entity=t.entity, name=self.cfg.name, id=run_id, resume="allow", mode=mode,
                dir=str(self.run_dir), config=self.cfg.to_dict(), tags=list(t.tags) or None,
                group=t.group, job_type=t.job_type, settings=wandb.Settings(init_timeout=60, silent=True))
            logged = self.run_dir / WANDB_LOGGED_FILE
            self._wandb_logged = int(logged.read_text().strip() or 0) if logged.exists() else 0
            self._wandb_offline_id = run_id if mode == "offline" else None
            # after kill -9 the counter can run ahead of what W&B kept: trust the offline files / the server
            if mode == "offline":
                self._wandb_logged = min(self._wandb_logged, last_offline_step(self.run_dir / "wandb", run_id))
            elif getattr(self.wandb, "resumed", False):  # online: the server's next step
                self._wandb_logged = min(self._wandb_logged, max(0, int(self.wandb.starting_step) - 1))
        except Exception as err:  # noqa: BLE001  (tracking must never kill a run)
            warnings.warn(f"W&B tracking disabled: {type(err).__name__}: {err}", stacklevel=2)
            self.wandb = None

    def wandb_folder(self) -> Path | None:
        """The W&B run's local folder (offline: what ``wandb sync`` uploads)."""
        try:
            return Path(self.wandb.dir).parent if self.wandb is not None else None
        except Exception:  # noqa: BLE001
            return None

    def replay(self, round_log: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        """Send W&B the round and evaluation records it has not seen (a run resumed after a crash: the rounds between
        the last record W&B got and the checkpoint), in round order."""
        if self.wandb is None:
            return
        evals = {h["round"]: h for h in history}
        for record in round_log:
            if record["round"] > self._wandb_logged:
                self._log_round_wandb(record, evals.get(record["round"]))

    def _wandb_log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.wandb is None:
            return
        try:
            self.wandb.log(data, step=step)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B log failed ({type(err).__name__}: {err}); continuing without W&B", stacklevel=2)
            self.wandb = None

    # -- progress bar -----------------------------------------------------------------------------------------
    def _start_progress(self, total: int, done: int) -> None:
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  TextColumn("{task.fields[latest]}"), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("rounds", total=total, completed=done, latest="")

    def message(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    # -- events -----------------------------------------------------------------------------------------------
    def _log_round_wandb(self, record: dict[str, Any], evaluation: dict[str, Any] | None) -> None:
        """One W&B step per round: its training record and, when it was evaluated, its evaluation."""
        data = {f"round/{k}": v for k, v in record.items() if k != "round"}
        if evaluation is not None:
            data.update({f"eval/{k}": v for k, v in evaluation.items() if k != "round" and v is not None})
        self._wandb_log(data, step=record["round"])
        if self.wandb is not None:
            self._wandb_logged = record["round"]
            (self.run_dir / WANDB_LOGGED_FILE).write_text(str(record["round"]))

    def log_round(self, record: dict[str, Any], round_log: list[dict[str, Any]],
                  evaluation: dict[str, Any] | None = None) -> None:
        """A finished round (and its evaluation, if it had one): CSV files, console line, progress bar, W&B."""
        write_csv(self.run_dir / ROUNDS_FILE, round_log)
        if evaluation is not None:
            self._log_eval_locally(evaluation)
        self._log_round_wandb(record, evaluation)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["round"], latest=self._latest)

    def _log_eval_locally(self, record: dict[str, Any]) -> None:
        heads = [k[4:] for k in record if k.startswith("acc_") and not k.endswith(("_std", "_weighted"))]
        self._latest = f"acc {record['acc_final']:.2f}% (best {record['best_acc_final']:.2f}%)"
        line = (f"round {record['round']:4d}  acc " + " / ".join(f"{h} {record['acc_' + h]:.2f}±"
                                                                  f"{record['acc_' + h + '_std']:.2f}" for h in heads)
                + f"  best {record['best_acc_final']:.2f} (round {record['best_round']})")
        if record.get("clients_without_test"):
            line += f"  ({record['clients_without_test']} clients without test data left out)"
        self.message(line)

    def write_evaluations(self, history: list[dict[str, Any]]) -> None:
        write_csv(self.run_dir / EVALUATIONS_FILE, history)

    def personalization_progress(self, done: int, total: int) -> None:
        """Personalisation's progress: a bar of clients fine-tuned (or a line every 10 % without a bar)."""
        if self._progress is not None:
            if self._ptask is None:
                self._ptask = self._progress.add_task("personalising", total=total, completed=0, latest="clients")
            self._progress.update(self._ptask, completed=done)
        elif done == total or (total >= 10 and done % max(1, total // 10) == 0):
            self.message(f"personalising: {done}/{total} clients fine-tuned")

    def log_personalization(self, pers: dict[str, Any]) -> None:
        rows = [{"epoch": e, "acc_mean": m, "acc_std": s}
                for e, (m, s) in enumerate(zip(pers["acc_mean"], pers["acc_std"]))]
        write_csv(self.run_dir / PERSONALIZATION_FILE, rows)
        self.message("personalised accuracy (final head) after fine-tuning epoch: " + ", ".join(
            f"{r['epoch']}: {r['acc_mean']:.2f}±{r['acc_std']:.2f}" for r in rows))
        if self.wandb is not None:
            try:
                import wandb

                table = wandb.Table(columns=["epoch", "acc_mean", "acc_std"],
                                    data=[[r["epoch"], r["acc_mean"], r["acc_std"]] for r in rows])
                self.wandb.log({"personalization/curve": wandb.plot.line(table, "epoch", "acc_mean",
                                                                         title="fine-tuning speed")},
                               step=self._wandb_logged or None)
                self.wandb.summary["personalized/acc_mean"] = rows[-1]["acc_mean"]
                self.wandb.summary["personalized/acc_std"] = rows[-1]["acc_std"]
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"W&B log failed ({err}); continuing without W&B", stacklevel=2)
                self.wandb = None

    def finish(self, results: dict[str, Any]) -> None:
        write_json(self.run_dir / RESULTS_FILE, results)
        plots: list[Path] = []
        if self.cfg.tracking.plots:
            try:
                plots = plot_run(self.run_dir)
                for path in plots:
                    self._wandb_image(path)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"plotting failed: {type(err).__name__}: {err}", stacklevel=2)
        if self.wandb is not None:
            try:
                for key in ("best_acc_final", "best_round", "rounds"):
                    self.wandb.summary[key] = results.get(key)
            except Exception:  # noqa: BLE001
                pass
        folder = self.wandb_folder() if self.wandb_mode == "offline" else None
        self.close()
        self.message(closing_line(self.run_dir, results, plots, folder))

    def _wandb_image(self, path: Path) -> None:
        if self.wandb is None:
            return
        try:
            import wandb

            self.wandb.log({f"plots/{path.stem}": wandb.Image(str(path))}, step=self._wandb_logged or None)
        except Exception:  # noqa: BLE001
            pass

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
                if self._wandb_offline_id is not None:
                    self._wait_for_offline_files(self._wandb_offline_id)
            except Exception:  # noqa: BLE001
                pass
            self.wandb = None

    def _wait_for_offline_files(self, run_id: str, timeout_s: float = 30.0) -> None:
        """``finish()`` can return before W&B's service process has written the offline run file (seen under CPU
        load): wait, bounded, until the file holds the last logged round, so that a resume or ``wandb sync`` right
        after this process sees every round."""
        deadline = time.monotonic() + timeout_s
        while (last_offline_step(self.run_dir / "wandb", run_id) < self._wandb_logged
               and time.monotonic() < deadline):
            time.sleep(0.1)


def closing_line(run_dir: Path, results: dict[str, Any], plots: list[Path], wandb_folder: Path | None) -> str:
    """The run's last line: the headline number and where its results, plots, checkpoint (and W&B folder) are."""
    pers = results.get("personalized")
    headline = (f"personalised {pers['acc_mean'][-1]:.2f}%" if pers
                else f"best global {results.get('best_acc_final', float('nan')):.2f}%")
    parts = [f"done: {headline}; results {run_dir / RESULTS_FILE}", f"checkpoint {run_dir / CHECKPOINT_FILE}"]
    if plots:
        parts.append(f"plots {run_dir}/*.png")
    if wandb_folder is not None:
        parts.append(f"W&B offline run {wandb_folder} (upload: wandb sync {wandb_folder})")
    return "; ".join(parts)

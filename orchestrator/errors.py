"""The orchestrator's error types (a leaf module: it imports nothing of fl-sd).

Each is raised with one line that names the problem and the fix; ``orchestrator.main`` prints it and exits non-zero.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the fix."""


class OptionError(ValueError):
    """A bad value of one field of an options dataclass (an algorithm's or a section's); the config layer turns it
    into a :class:`ConfigError` naming the full key, e.g. ``config key algorithm.ditto.lam: must be >= 0, got -1``."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


class RunDirError(ValueError):
    """An unusable run directory."""


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingDiverged(RuntimeError):
    """A local loss became NaN/Inf; the message says where (round, client)."""


class RunInterrupted(Exception):
    """SIGTERM or Ctrl-C stopped a run; ``checkpointed`` says whether a checkpoint of ``round`` was just written."""

    def __init__(self, signal_name: str, run_dir, round_idx: int, checkpointed: bool):
        self.signal_name, self.run_dir, self.round, self.checkpointed = signal_name, run_dir, round_idx, checkpointed
        if run_dir is None:  # before a run directory held anything (imports, data loading)
            super().__init__(f"stopped by {signal_name} before the run started (nothing to resume); start it again")
            return
        saved = (f"checkpoint of round {round_idx} saved" if checkpointed
                 else "the last checkpoint is intact")
        super().__init__(f"stopped by {signal_name} ({saved}); continue with --resume {run_dir}")


class SweepError(ValueError):
    """A bad sweep file, or a sweep that cannot start (its output directory is in use or holds other runs)."""

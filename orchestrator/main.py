"""Entry point: ``fl-sd --config configs/cifar100.yaml [--federation.rounds 10 ...]`` (or ``python
orchestrator/main.py ...``).

``--resume RUN_DIR`` continues an interrupted run. Bad input ends with one line on stderr and exit code 2
(set FLSD_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.errors import (CheckpointError, ConfigError, RunDirError, RunInterrupted,  # noqa: E402
                                 TrainingDiverged)
from orchestrator.schema import check_keys  # noqa: E402  (no torch)

#: Loaded in steps, so that bad input is reported without waiting for what is not needed yet: the config keys are
#: checked from the schema alone (orchestrator.schema), then the full config (with the algorithm registry and
#: torch) is parsed and validated, then the training stack (Lightning, torchvision) is loaded.
CONFIG = "orchestrator.config"
TRAINING_STACK = "orchestrator.runner"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    previous = _stop_on_sigterm()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """Until the runner installs its own handler: SIGTERM (while torch loads, say) ends with one line, not silently.
    Returns the previous handler (None outside the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        raise RunInterrupted("SIGTERM", None, -1, False)

    return signal.signal(signal.SIGTERM, stop)


def _main(argv: list[str]) -> int:
    try:
        if "--resume" in argv:
            i = argv.index("--resume")
            if len(argv) != 2 or i != 0:
                raise ConfigError("--resume RUN_DIR takes no other options: the run's own config.yaml is used")
            importlib.import_module(TRAINING_STACK).run(None, resume=argv[1])
        else:
            check_keys(argv)
            cfg, _ = importlib.import_module(CONFIG).parse_args(argv)
            importlib.import_module(TRAINING_STACK).run(cfg)
    except (ConfigError, CheckpointError, RunDirError, *_data_errors()) as err:
        return _fail(f"error: {err}")
    except TrainingDiverged as err:
        return _fail(f"error: training diverged at {err}; lower federation.lr or check the data. "
                     "The last checkpoint is intact.", code=3)
    except RunInterrupted as err:
        return _fail(f"error: {err}", code=130 if err.signal_name == "Ctrl-C" else 143)
    except (ValueError, OSError, RuntimeError) as err:  # any other bad input: still one line
        return _fail(f"error: {type(err).__name__}: {err}")
    except KeyboardInterrupt:  # before the run directory exists: nothing to resume
        return _fail("interrupted before the run started", code=130)
    return 0


def _data_errors() -> tuple[type, ...]:
    """fl_sd.data's DataError once the data layer is loaded (importing it here would load torch up front)."""
    sources = sys.modules.get("fl_sd.data.sources")
    return (sources.DataError,) if sources is not None else ()


def cli() -> None:
    """The ``fl-sd`` console command."""
    sys.exit(main())


def _fail(message: str, code: int = 2) -> int:
    if os.environ.get("FLSD_DEBUG"):
        raise
    print(" ".join(message.split()), file=sys.stderr)  # always exactly one line
    return code


if __name__ == "__main__":
    cli()

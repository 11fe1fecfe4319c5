"""Small I/O helpers shared by the data layer and the orchestrator."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    A process killed mid-write leaves the previous file intact and no temporary file behind (on exceptions). The file
    gets the mode an ordinary ``open()`` would give it (0666 less the umask), not ``mkstemp``'s private 0600, so run
    directories can be shared on a cluster.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

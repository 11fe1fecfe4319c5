"""The base of an algorithm's typed options (``algorithm.<name>.*`` in the config).

Kept apart from the algorithm contract: the config parser reads the modules that define option classes, and this
one needs nothing but the standard library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class AlgorithmOptions:
    """Base of an algorithm's typed options; ``validate`` raises :class:`~orchestrator.errors.OptionError`."""

    #: fields that hold file system paths: a run stores them absolute (``Config.make_paths_absolute``)
    path_fields: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        pass

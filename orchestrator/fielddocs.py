"""One-line descriptions of dataclass fields, read from their ``#:`` comments (a leaf module).

``name: type = default  #: text`` or ``#: text`` on the lines above a field is the field's description (the
Sphinx convention). :func:`describe` writes them into the class docstring's ``Args:`` section, where jsonargparse's
``--help`` finds them, so the comment in the source is the one place a key is described.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

_FIELD = re.compile(r"(\w+)\s*:[^#]*(?:#:\s*(.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """{field: description} of ``cls`` and its dataclass bases (a field's own class wins)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()[1:]
        except (OSError, TypeError):  # made at run time (dataclasses.make_dataclass): no source
            continue
        pending: list[str] = []
        for line in lines:
            text = line.strip()
            if text.startswith("#:"):
                pending.append(text[2:].strip())
                continue
            match = _FIELD.match(text)
            if match and match.group(1) in names:
                doc = " ".join(pending + [match.group(2) or ""]).strip()
                if doc:
                    out[match.group(1)] = doc
            pending = []
    return out


def describe(cls: type, extra: dict[str, str] | None = None) -> type:
    """Append an ``Args:`` section of the field descriptions (plus ``extra``) to ``cls.__doc__``; returns cls."""
    docs = {**field_comments(cls), **(extra or {})}
    summary = (cls.__doc__ or cls.__name__).split("\n\nArgs:\n")[0].rstrip()
    if not docs:
        return cls
    args = "\n".join(f"    {name}: {' '.join(text.split())}" for name, text in docs.items())
    cls.__doc__ = f"{summary}\n\nArgs:\n{args}\n"
    return cls


def undescribed(cls: type, extra: tuple[str, ...] = ()) -> list[str]:
    """The fields of ``cls`` without a description (for tests)."""
    docs = field_comments(cls)
    return [f.name for f in dataclasses.fields(cls) if f.name not in docs and f.name not in extra]

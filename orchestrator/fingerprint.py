"""What makes two configs the same experiment, and which edits a resume accepts (a leaf module).

A run's identity is its whole resolved config (``Config.to_dict()``) except the keys below. The checkpoint stores
that config; ``--resume`` compares it with the run directory's (possibly edited) ``config.yaml`` and refuses any
other difference, naming each key with both values.
"""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

#: Keys that do not change what a run computes: where it lives, where it runs, how it is watched.
#: (``federation.eval_batch_size`` is not among them: with BatchNorm without running statistics a client's test split
#: longer than it is evaluated in batches of that size, which changes the numbers.)
NOT_IDENTITY = ("name", "run_dir", "device", "memory_format", "flower.", "batched.", "tracking.", "checkpoint.",
                "data.root", "data.download")

#: Edits ``--resume`` accepts besides NOT_IDENTITY: more rounds (the learning-rate milestones are fractions of the
#: new R, so the rounds still to run follow the new schedule; the result is not a fresh run with that R).
RESUME_MAY_CHANGE = ("federation.rounds",)

#: Keys that tell runs of one experiment apart: the seed (a table pools a cell's seeds), and NOT_IDENTITY.
NOT_EXPERIMENT = ("seed",) + NOT_IDENTITY


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; a dict-valued key (e.g. model.options) is flattened too."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _ignored(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in prefixes)


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = NOT_IDENTITY) -> list[str]:
    """``key: old -> new`` for every identity key whose value differs (sorted by key)."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if _ignored(key, ignore):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            out.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return out


def resume_differences(saved: dict[str, Any], current: dict[str, Any], rounds_done: int,
                       defaults: dict[str, Any] | None = None) -> list[str]:
    """The edits of ``current`` (config.yaml now) against ``saved`` (the checkpoint's) that a resume must refuse. A
    key ``saved`` lacks (a checkpoint of an older fl-sd, before the key existed) stands at its value in ``defaults``
    (the default config): an option added later defaults to the behaviour from before, so leaving it there is no
    edit."""
    if defaults:
        flat, now = flatten(saved), flatten(current)
        saved = {**{k: v for k, v in flatten(defaults).items() if k not in flat and k in now}, **flat}
    out = differences(saved, current, NOT_IDENTITY + RESUME_MAY_CHANGE)
    rounds = flatten(current).get("federation.rounds")
    if isinstance(rounds, int) and rounds < rounds_done:
        out.append(f"federation.rounds: {rounds} is below the {rounds_done} rounds the checkpoint has completed")
    return out


def summary(diffs: list[str], limit: int = 4) -> str:
    text = "; ".join(diffs[:limit])
    return text + (f"; and {len(diffs) - limit} more" if len(diffs) > limit else "")


def experiment(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without NOT_EXPERIMENT: runs with equal ``experiment()`` are seeds of one experiment."""
    return {k: v for k, v in flatten(config).items() if not _ignored(k, NOT_EXPERIMENT)}


def group_experiments(items: list[tuple[dict[str, Any], T]]) -> list[list[T]]:
    """``[(config, item), ...]`` -> the items grouped by :func:`experiment` (groups in order of first appearance)."""
    groups: dict[str, list[T]] = {}
    for config, item in items:
        groups.setdefault(repr(sorted(experiment(config).items())), []).append(item)
    return list(groups.values())


def distinguishing(configs: list[dict[str, Any]]) -> list[str]:
    """The experiment keys whose values are not the same in all ``configs`` (sorted)."""
    flats = [experiment(c) for c in configs]
    keys = sorted({k for f in flats for k in f})
    return [k for k in keys if len({repr(f.get(k, "<unset>")) for f in flats}) > 1]


def label(config: dict[str, Any], keys: list[str]) -> str:
    """``key=value, ...`` of ``config`` for ``keys`` (from :func:`distinguishing`)."""
    flat = experiment(config)
    return ", ".join(f"{k}={flat.get(k, '<unset>')!r}" for k in keys)

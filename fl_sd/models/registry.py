"""Model registry: ``@register_model(name, default_loss=...)`` on a class, ``create_model(name, ...)`` to build."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .base import MultiHeadNet


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., MultiHeadNet]
    #: Per-model loss weights the reference used (SPEC "Decisions": aux CE weight, KD weight, scaler).
    default_loss: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, default_loss: dict[str, Any] | None = None, description: str = ""):
    def decorator(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, builder, dict(default_loss or {}), description)
        return builder

    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}") from None


def create_model(name: str, num_classes: int, **options: Any) -> MultiHeadNet:
    """Build a registered multi-head model: ``create_model("mobilenet", num_classes=100)``."""
    entry = model_entry(name)
    try:
        return entry.builder(num_classes=num_classes, **options)
    except TypeError as err:  # an unknown option: name it
        raise ValueError(f"model {name!r}: bad option ({err}); check model options in the config") from None

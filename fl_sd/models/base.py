"""The multi-head model contract shared by every architecture.

A :class:`MultiHeadNet` is a body (feature extractor) carrying a final classifier and any number of auxiliary
classifiers at intermediate depths. Which parameters are *head* and which are *body* is declared by module role:
the final classifier lives in ``self.classifier`` (with, for the historic ResNet-50 only, a per-sample temperature
``self.final_scaler``) and the auxiliary heads in ``self.aux_heads``; everything else is body. Subclasses implement
:meth:`forward_features` only.

Head layouts (``head_layout`` of cnn4 / resnet18 / resnet50): ``fixed`` (the default) attaches one :class:`AuxHead`
per depth; ``historic`` rebuilds the reference's research code (SPEC 2.2-2.3): where its heads read features and, for
the ResNets, its :class:`ScalerAuxHead` (a separate ``Linear(C, 1)`` scaler with an offset) and ResNet-50's scaled
final head.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Iterator, Literal, NamedTuple

import torch
from torch import Tensor, nn


class MultiHeadOutput(NamedTuple):
    """What every registered model returns.

    ``final``: (B, K) logits of the final head (never temperature-scaled).
    ``aux``: per auxiliary head, (B, K) class logits as the model serves them: divided by the learned
    temperature sigmoid(s) in training mode (when ``scale_aux``), unscaled in eval mode -- as the reference.
    ``aux_raw``: per auxiliary head, the unscaled (B, K) class logits u.
    ``temperature``: per auxiliary head, the (B,) learned per-sample temperature sigmoid(s) in (0, 1) (historic
    ResNet heads: sigmoid(alpha) + eps, :class:`ScalerAuxHead`).
    ``final_scaled``: ``()`` for every model without a final-head scaler; for the historic ResNet-50, one (B, K)
    tensor: the final logits as served to the loss, divided by ``final_scaler``'s temperature in training mode (when
    ``scale_aux``), equal to ``final`` otherwise. The loss uses it in place of ``final`` when its scaler is on. (A
    tuple, not None, so that ``torch.func.vmap`` can return the output.)
    """

    final: Tensor
    aux: tuple[Tensor, ...]
    aux_raw: tuple[Tensor, ...]
    temperature: tuple[Tensor, ...]
    final_scaled: tuple[Tensor, ...] = ()


#: ``head_layout`` values: ``fixed`` = fl-sd's (one AuxHead per depth), ``historic`` = the reference code's.
HEAD_LAYOUTS = ("fixed", "historic")
HeadLayout = Literal["fixed", "historic"]


def check_head_layout(layout: str) -> str:
    if layout not in HEAD_LAYOUTS:
        raise ValueError(f"head_layout must be one of {HEAD_LAYOUTS}, got {layout!r}")
    return layout


class AuxHead(nn.Module):
    """Global average pool, then one bias-free Linear(C -> K + 1); the last output is the temperature logit s.

    The temperature logit's weights are the last row of ``fc.weight`` (and of ``fc.bias`` when there is one),
    ``TEMPERATURE_ROWS``: an algorithm can train or share them apart from the class rows (:func:`head_piece_rows`).
    """

    TEMPERATURE_ROWS = slice(-1, None)

    def __init__(self, in_channels: int, num_classes: int, bias: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_channels, num_classes + 1, bias=bias)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        z = self.fc(feature.mean(dim=(2, 3)))
        return z[:, : self.num_classes], torch.sigmoid(z[:, self.num_classes])


class Scaler(nn.Linear):
    """The historic ResNets' temperature: Linear(C -> 1, bias) on the pooled feature, sigmoid, plus ``eps``:
    a per-sample temperature in (eps, 1 + eps)."""

    def __init__(self, in_features: int, eps: float):
        super().__init__(in_features, 1, bias=True)
        self.eps = float(eps)

    def forward(self, pooled: Tensor) -> Tensor:
        return torch.sigmoid(super().forward(pooled)).squeeze(1) + self.eps


class ScalerAuxHead(nn.Module):
    """The historic ResNets' auxiliary head (SPEC 2.3): global average pool, Linear(C -> K, bias) for the class logits
    and a separate :class:`Scaler` (``Linear(C -> 1, bias)``, sigmoid, + ``eps``) for the temperature."""

    def __init__(self, in_channels: int, num_classes: int, eps: float):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_channels, num_classes, bias=True)
        self.scaler = Scaler(in_channels, eps)

    def forward(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        pooled = feature.mean(dim=(2, 3))
        return self.fc(pooled), self.scaler(pooled)


def batch_norm(track_running_stats: bool):
    """A BatchNorm2d factory: MHMD's models track running statistics, FedBABU's originals do not."""

    def make(channels: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(channels, track_running_stats=track_running_stats)

    return make


#: Pieces of the head, finer than the head as a whole (:func:`head_piece_rows`).
HEAD_PIECES = ("final_head", "aux_heads", "temperature")


def head_piece_rows(piece: str, keys) -> dict[str, slice | None]:
    """Which of the state-dict ``keys`` -- and which rows of them (``None``: the whole tensor) -- hold a piece of the
    head: ``final_head`` (``classifier.*`` and the historic ResNet-50's ``final_scaler.*``), ``aux_heads``
    (``aux_heads.*``: class and temperature rows) or ``temperature`` (every auxiliary head's temperature: the last row
    of an :class:`AuxHead`'s ``fc``, ``AuxHead.TEMPERATURE_ROWS``; the whole ``scaler`` of a :class:`ScalerAuxHead`,
    whose ``fc`` then holds class rows only).

    A function of the key names alone, so the server side (which holds states, not networks) applies the same rule
    as the client side."""
    if piece not in HEAD_PIECES:
        raise ValueError(f"unknown head piece {piece!r}; choose one of {HEAD_PIECES}")
    keys = list(keys)
    split = [key.split(".") for key in keys]
    with_scaler = {parts[1] for parts in split if parts[0] == "aux_heads" and parts[2:3] == ["scaler"]}
    rows: dict[str, slice | None] = {}
    for key, parts in zip(keys, split):
        if piece == "final_head" and parts[0] in ("classifier", "final_scaler"):
            rows[key] = None
        elif piece == "aux_heads" and parts[0] == "aux_heads":
            rows[key] = None
        elif piece == "temperature" and parts[0] == "aux_heads":
            if parts[2:3] == ["scaler"]:
                rows[key] = None
            elif parts[2:3] == ["fc"] and parts[1] not in with_scaler:
                rows[key] = AuxHead.TEMPERATURE_ROWS
    return rows


class MultiHeadNet(nn.Module):
    """Base class: body + final classifier (``self.classifier``) + auxiliary heads (``self.aux_heads``), optionally a
    final-head temperature (``self.final_scaler``, a :class:`Scaler`; None for every model but the historic
    ResNet-50)."""

    #: Module attributes that hold head parameters. Everything else is body.
    HEAD_MODULES = ("classifier", "aux_heads", "final_scaler")

    classifier: nn.Module
    aux_heads: nn.ModuleList
    final_scaler: nn.Module | None

    def __init_subclass__(cls, **kwargs):
        # Record the constructor arguments of every concrete network (``build_options``), so that a network built
        # directly (``CNNCifar(10, width=8)``) can be rebuilt from its registry name and options, e.g. when a
        # Lightning checkpoint is loaded.
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            if type(self) is cls:  # the outermost constructor's arguments describe the object
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                options = {}
                for name, value in list(bound.arguments.items())[1:]:
                    if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                        options.update(value)
                    elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                        options[name] = value
                self._build_options = options

        cls.__init__ = recording_init

    def __init__(self, num_classes: int, scale_aux: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.scale_aux = scale_aux
        self.final_scaler = None  # a subclass may set a Scaler (the historic ResNet-50)

    # -- subclass hook --------------------------------------------------------------------------------------
    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return (flat feature for the final classifier, [feature map for each auxiliary head])."""
        raise NotImplementedError

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> MultiHeadOutput:
        feature, aux_features = self.forward_features(x)
        final = self.classifier(feature)
        aux, raw, temps = [], [], []
        scale = self.training and self.scale_aux
        final_scaled: tuple[Tensor, ...] = ()
        if self.final_scaler is not None:
            final_scaled = (final / self.final_scaler(feature).unsqueeze(1) if scale else final,)
        for head, feat in zip(self.aux_heads, aux_features):
            u, t = head(feat)
            raw.append(u)
            temps.append(t)
            aux.append(u / t.unsqueeze(1) if scale else u)
        return MultiHeadOutput(final, tuple(aux), tuple(raw), tuple(temps), final_scaled)

    @property
    def num_aux_heads(self) -> int:
        return len(self.aux_heads)

    def build_options(self) -> dict[str, Any]:
        """The constructor's keyword arguments except ``num_classes`` (with defaults): ``type(net)(num_classes=K,
        **net.build_options())`` builds the same architecture."""
        options = dict(getattr(self, "_build_options", {}))
        options.pop("num_classes", None)
        return options

    # -- body / head split, by module role ------------------------------------------------------------------
    def head_modules(self) -> list[nn.Module]:
        return [m for m in (getattr(self, name, None) for name in self.HEAD_MODULES) if m is not None]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.head_modules():
            yield from module.parameters()

    def body_parameters(self) -> Iterator[nn.Parameter]:
        head_ids = {id(p) for p in self.head_parameters()}
        return (p for p in self.parameters() if id(p) not in head_ids)

    def named_part_parameters(self, part: str) -> list[tuple[str, nn.Parameter]]:
        """``(state-dict name, parameter)`` of the ``body`` or the ``head`` (final + auxiliary classifiers)."""
        if part not in ("body", "head"):
            raise ValueError(f"part must be 'body' or 'head', got {part!r}")
        want_head = part == "head"
        return [(n, p) for n, p in self.named_parameters() if self.is_head_key(n) == want_head]

    def is_head_key(self, key: str) -> bool:
        """Whether a ``state_dict`` key belongs to a head module."""
        return key.split(".", 1)[0] in self.HEAD_MODULES

    def body_state_keys(self) -> list[str]:
        """State-dict keys of the body: parameters and buffers (BN running statistics included)."""
        return [k for k in self.state_dict() if not self.is_head_key(k)]

    def head_state_keys(self) -> list[str]:
        return [k for k in self.state_dict() if self.is_head_key(k)]

    def head_piece_rows(self, piece: str) -> dict[str, slice | None]:
        """:func:`head_piece_rows` of this network's head keys."""
        return head_piece_rows(piece, self.head_state_keys())


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def use_channels_last(net: nn.Module) -> nn.Module:
    """Run ``net`` in the channels_last layout (NHWC in memory): its 4-D weights are converted, and a forward pre-hook
    makes every 4-D input channels_last, so the activations follow. The numbers are those of the default layout up to
    floating-point reassociation; state dicts keep their keys and shapes (``load_state_dict`` copies into either
    layout). Not under ``torch.func.vmap``: querying or changing the memory format of a batched tensor is not
    implemented there (torch 2.x), and vmap's convolution batching rule regroups the clients of a stacked
    computation into one grouped convolution in the default layout anyway."""
    net.to(memory_format=torch.channels_last)
    net.register_forward_pre_hook(_channels_last_input)
    return net

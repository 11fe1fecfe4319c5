"""K models of one architecture as stacked tensors, and their forward pass as one vmapped computation (torch.func).

Used by the batched engine (``lightning_modules.batched``) and by batched evaluation (``orchestrator.evaluation``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, vmap

State = Mapping[str, Tensor]


@dataclass
class StackedModels:
    """K models as stacked tensors: ``tensors[key]`` is ``(K, *shape)`` for every ``state_dict`` key."""

    tensors: dict[str, Tensor]

    @classmethod
    def stack(cls, states: Sequence[State], keys: Sequence[str]) -> "StackedModels":
        return cls({k: torch.stack([s[k] for s in states]) for k in keys})

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def state(self, k: int) -> dict[str, Tensor]:
        """Client ``k``'s state as views into the stacked tensors."""
        return {key: value[k] for key, value in self.tensors.items()}

    def select(self, index: Tensor) -> "StackedModels":
        return StackedModels({key: value.index_select(0, index) for key, value in self.tensors.items()})


def stacked_forward(net: torch.nn.Module, models: StackedModels, x: Tensor):
    """``net``'s output for ``x`` of shape ``(K, B, ...)``, model k on ``x[k]``, in the network's current mode (in
    train mode BatchNorm running statistics of ``models`` are left unchanged)."""
    buffers = {k for k, _ in net.named_buffers()}

    def one(state, xk):
        return functional_call(net, {k: v.clone() if k in buffers else v for k, v in state.items()}, (xk,))
    return vmap(one)(models.tensors, x)

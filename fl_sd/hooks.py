"""Hooks into a local SGD loop: what an algorithm adds to plain local training, without a loop of its own.

The one local loop (``lightning_modules.MultiHeadClassifier.local_update``) runs, for every batch (step i, 0-based)::

    zero_grad; loss = L(net(x), y); loss.backward()
    skip = hooks.before_step(i, optimizer)      # e.g. add a proximal gradient, switch learning rates, save weights
    if not skip: optimizer.step()
    hooks.after_step(i, optimizer)              # e.g. a proximal pull after the momentum step

and reports the metrics of the steps where ``hooks.record(i)`` is true. Every parameter group of the optimizer holds
``params`` and their state-dict ``names`` (and ``name``: ``body`` or ``head``), so a hook can address parameters by
name. Examples: Ditto's proximal term, Per-FedAvg's meta-steps (orchestrator/algorithms).
"""
from __future__ import annotations

from typing import Iterator

import torch


class StepHooks:
    """No-op hooks; subclass and override what you need."""

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Called after the backward pass of step ``step``; return True to skip the optimizer's step."""
        return False

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after the optimizer's step (or its skip)."""

    def record(self, step: int) -> bool:
        """Whether step ``step`` counts in the update's metrics (loss, accuracy, temperatures)."""
        return True


def named_params(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.nn.Parameter, dict]]:
    """``(state-dict name, parameter, its group)`` for every parameter of the optimizer, in group order."""
    for group in optimizer.param_groups:
        for name, param in zip(group["names"], group["params"]):
            yield name, param, group


class StepOnly(StepHooks):
    """Lets the optimizer step only the given parameters, or rows of them, and freezes the rest of what it holds.

    ``rows``: ``{state-dict name: rows}`` (``None``: the whole tensor; a slice: those rows of dimension 0). A
    parameter not named gets no gradient, so SGD skips it (no momentum, no weight decay); rows not named of a named
    parameter get a zero gradient and are put back after the step, so they stay bit for bit what they were (also
    with weight decay). Gradients still flow through frozen parameters into the ones that train.
    """

    def __init__(self, rows: dict[str, slice | None]):
        self.rows = dict(rows)
        self._frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def before_step(self, step, optimizer):
        self._frozen = []
        for name, p, _ in named_params(optimizer):
            if name not in self.rows:
                p.grad = None
                continue
            rows = self.rows[name]
            if rows is None:
                continue
            frozen = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            frozen[rows] = False
            if p.grad is not None:
                p.grad[frozen] = 0
            self._frozen.append((p, frozen, p[frozen].clone()))
        return False

    @torch.no_grad()
    def after_step(self, step, optimizer):
        for p, frozen, values in self._frozen:
            p[frozen] = values
        self._frozen = []

"""Local-training pieces shared by the baselines that need their own loop (Per-FedAvg, Ditto).

They use the federation's one client module (``fed.module``): its network, its loss (``fed.module.loss_fn``) and its
optimizer settings (SGD, momentum and weight decay from ``federation.*``), as ``MultiHeadClassifier.local_update``
does; nothing is copied.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from lightning_modules.client import NonFiniteLossError

State = dict[str, Tensor]


def optimizer(fed, part: str, lr: float) -> torch.optim.SGD:
    """A fresh SGD optimizer over ``part`` (body/head/full) of ``fed.module.net`` at the round's learning rate(s)."""
    fed.module.set_train_part(part, lr=lr, head_lr=fed.head_lr(lr))
    return fed.module.make_optimizer()


def backward(fed, opt: torch.optim.Optimizer, batch) -> Tensor:
    """Forward one ``(x, y)`` batch in train mode, zero the gradients, backpropagate the local loss; return it."""
    x, y = batch
    net = fed.module.net
    net.train()
    with torch.enable_grad():
        loss = fed.module.loss_fn(net(x), y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
    return loss.detach()


def sgd_steps(fed, batches: Iterable, lr: float, part: str = "full",
              extra_grad: Callable[[str, Tensor], Tensor] | None = None) -> dict[str, float]:
    """One SGD step per batch on ``fed.module.net`` from its current weights (fresh optimizer, momentum reset).

    ``extra_grad(name, param)``, when given, is added to each trainable parameter's gradient before the step (e.g.
    Ditto's proximal pull ``lam * (param - global)``). Returns ``{"loss": mean local loss}``; raises
    :class:`NonFiniteLossError` on a NaN/Inf loss.
    """
    opt = optimizer(fed, part, lr)
    named = [(n, p) for n, p in fed.module.net.named_parameters() if p.requires_grad]
    losses = []
    for batch in batches:
        losses.append(backward(fed, opt, batch))
        if extra_grad is not None:
            with torch.no_grad():
                for name, p in named:
                    g = extra_grad(name, p)
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.add_(g)
        opt.step()
    opt.zero_grad(set_to_none=True)
    return {"loss": check_finite(losses)}


def check_finite(losses: list[Tensor]) -> float:
    """Mean of the step losses (one host synchronisation); NonFiniteLossError naming the first bad step."""
    if not losses:
        raise ValueError("local update got no batches")
    table = torch.stack(losses)
    finite = torch.isfinite(table)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise NonFiniteLossError(bad + 1, len(losses), float(table[bad]))
    return float(table.mean())


def full_state(fed) -> State:
    """Detached clones of the whole network state (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in fed.module.net.state_dict().items()}

"""Evaluation of every head on every client's test split.

When all clients share the global model, the test set is passed through the network once and the per-sample
results are grouped by client afterwards (the clients' test splits partition the test set). Algorithms with
per-client models (personal heads) are evaluated client by client.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fl_sd.models import MultiHeadNet


def head_names(net: MultiHeadNet) -> list[str]:
    return ["final"] + [f"aux{i}" for i in range(net.num_aux_heads)]


@torch.no_grad()
def predict(net: MultiHeadNet, data, indices: torch.Tensor | None, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, loss): (H, n) bool and float tensors for the samples ``indices`` (all when None), in order.

    Auxiliary logits are the unscaled ones in eval mode (as the reference's evaluation).
    """
    was_training = net.training
    net.eval()
    corrects, losses = [], []
    try:
        for x, y in data.iterate(batch_size, indices):
            out = net(x)
            logits = (out.final, *out.aux)
            corrects.append(torch.stack([lg.argmax(dim=1) == y for lg in logits]))
            losses.append(torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits]))
    finally:
        net.train(was_training)
    return torch.cat(corrects, dim=1), torch.cat(losses, dim=1)


def per_client(values: torch.Tensor, owner: torch.Tensor, num_clients: int) -> torch.Tensor:
    """Per-client means of (H, n) per-sample ``values``; ``owner[i]`` is sample i's client (-1: none)."""
    keep = owner >= 0
    values, owner = values[:, keep].double(), owner[keep]
    sums = torch.zeros(values.shape[0], num_clients, dtype=torch.float64, device=values.device)
    sums.index_add_(1, owner, values)
    counts = torch.bincount(owner, minlength=num_clients).clamp_min(1).double()
    return sums / counts


def summarize(acc: np.ndarray, loss: np.ndarray, sizes: np.ndarray, names: list[str]) -> dict[str, float]:
    """acc/loss: (H, clients) in [0, 1]. Mean and std (ddof 0) over clients in %, and the size-weighted mean."""
    out: dict[str, float] = {}
    weights = sizes / sizes.sum()
    for h, name in enumerate(names):
        out[f"acc_{name}"] = float(100 * acc[h].mean())
        out[f"acc_{name}_std"] = float(100 * acc[h].std())
        out[f"acc_{name}_weighted"] = float(100 * (acc[h] * weights).sum())
        out[f"loss_{name}"] = float((loss[h] * weights).sum())
    return out

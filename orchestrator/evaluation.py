"""Evaluation of every head on every client's test split, for the global model and for per-client models.

When all clients share one model, the test set is passed through the network once and the per-sample results are
grouped by client afterwards (the clients' test splits partition the test set). Per-client models are evaluated
client by client; which model a client is evaluated with is the algorithm's decision (``Algorithm.evaluate``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fl_sd.models import MultiHeadNet

if TYPE_CHECKING:  # pragma: no cover
    from .clients import ClientRuntime

State = dict[str, torch.Tensor]
#: per-client accuracy and loss of every head: two (H, num_clients) arrays, accuracy in [0, 1]
Scores = tuple[np.ndarray, np.ndarray]


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


def shared_model(runtime: "ClientRuntime", state: State) -> Scores:
    """Every client evaluated with the same model: one pass over the test set, grouped by client."""
    runtime.load(state)
    correct, loss = runtime.predict(None)
    n = runtime.num_clients
    return (per_client(correct, runtime.test_owner, n).cpu().numpy(),
            per_client(loss, runtime.test_owner, n).cpu().numpy())


def client_models(runtime: "ClientRuntime", model_of: Callable[[int], State]) -> Scores:
    """Client c evaluated with ``model_of(c)`` (a full state) on its own test split."""
    n, heads = runtime.num_clients, len(runtime.heads)
    acc, lss = np.zeros((heads, n)), np.zeros((heads, n))
    for c in range(n):
        runtime.load(model_of(c))
        correct, loss = runtime.predict(c)
        acc[:, c] = correct.double().mean(1).cpu().numpy()
        lss[:, c] = loss.double().mean(1).cpu().numpy()
    return acc, lss


def client_accuracy(runtime: "ClientRuntime", client: int) -> float:
    """Final-head accuracy in [0, 1] of the network's current weights on ``client``'s test split."""
    correct, _ = runtime.predict(client)
    return float(correct[0].double().mean())


@torch.no_grad()
def temperature_stats(runtime: "ClientRuntime", state: State) -> dict[str, float]:
    """Mean learned temperature sigmoid(s) of each auxiliary head of ``state`` on (up to 1000) test images."""
    runtime.load(state)
    net = runtime.net
    was_training = net.training
    net.eval()
    try:
        x, _ = next(iter(runtime.test_data.iterate(min(1000, len(runtime.test_data)))))
        out = net(x)
    finally:
        net.train(was_training)
    return {f"temp_aux{i}": float(t.mean()) for i, t in enumerate(out.temperature)}

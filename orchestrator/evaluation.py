"""Evaluation of every head on every client's test split, for the global model and for per-client models.

When all clients share one model whose predictions do not depend on the batch (BatchNorm with running statistics, or
no BatchNorm), the test set is passed through the network once and the per-sample results are grouped by client
afterwards (the clients' test splits partition the test set). A model whose BatchNorm has no running statistics
normalises with the statistics of the batch it is given, also in eval mode: as the reference (FedBABU's
``test_img_local``), each client's test split is then its own batch (splits longer than ``eval_batch_size`` in chunks
of that size), so a prediction never depends on another client's images. Per-client models are evaluated client
by client; which model a client is evaluated with is the algorithm's decision (``Algorithm.evaluate``). Clients
without test data score NaN and are left out of the means (``summarize`` reports how many).

Speed (docs/RESULTS.md, "Evaluation against its floor"): where the images per forward pass do not change the numbers
(a model without batch-dependent BatchNorm), a pass on a CPU takes at most :data:`CPU_PASS_IMAGES` images, the measured per-image optimum; ``federation.eval_batch_size`` is the upper
bound (and, for batch-dependent BatchNorm, the chunk a long split is cut into). The learned temperatures of the global
model (:func:`temperature_stats`) come from the evaluation pass itself when it is one pass of that model over the
test set (``Scores.temperatures``, returned by :func:`shared_model`), not from a second forward pass.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fl_sd.models import MultiHeadNet
from fl_sd.stacked import StackedModels, stacked_forward

if TYPE_CHECKING:  # pragma: no cover
    from .clients import ClientRuntime

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Scores:
    """Per-client accuracy and loss of every head: two (H, num_clients) arrays, accuracy in [0, 1] (NaN for a client
    without test data); unpacks and indexes as the pair ``(acc, loss)``. ``temperatures``: when every client was scored with one model, the
    learned temperatures of that model (``{temp_aux<i>: mean}``) taken from the same forward passes, else None (the
    federation then computes those of the global model with :func:`temperature_stats`)."""

    acc: np.ndarray
    loss: np.ndarray
    temperatures: dict[str, float] | None = None

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.acc, self.loss))

    def __getitem__(self, index: int) -> np.ndarray:
        return (self.acc, self.loss)[index]


def head_names(net: MultiHeadNet) -> list[str]:
    return ["final"] + [f"aux{i}" for i in range(net.num_aux_heads)]


#: the most images per forward pass on a CPU where the pass size does not change the numbers: per image the fastest
#: size measured for MobileNet and cnn4 (docs/RESULTS.md, "Evaluation against its floor"); larger activations fall
#: out of the caches and, beyond glibc's mmap threshold, come as fresh zeroed pages from the kernel on every pass
CPU_PASS_IMAGES = 50
#: the learned temperatures are averaged over the first this many test images (as one batch)
TEMPERATURE_IMAGES = 1000


def pass_images(batch_size: int, device: torch.device) -> int:
    """Images per forward pass where their number does not change the results: ``batch_size``
    (``federation.eval_batch_size``), at most :data:`CPU_PASS_IMAGES` on a CPU."""
    return min(batch_size, CPU_PASS_IMAGES) if device.type == "cpu" else batch_size


@torch.no_grad()
def predict(net: MultiHeadNet, data, indices: torch.Tensor | None, batch_size: int,
            autocast: torch.autocast | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, loss): (H, n) bool and float tensors for the samples ``indices`` (all when None), in order, in
    batches of ``batch_size`` (of :func:`pass_images` when the network's predictions do not depend on the batch).

    Auxiliary logits are the unscaled ones in eval mode (as the reference's evaluation).
    """
    correct, loss, _ = predict_with_temperatures(net, data, indices, batch_size, autocast, 0)
    return correct, loss


@torch.no_grad()
def predict_with_temperatures(net: MultiHeadNet, data, indices: torch.Tensor | None, batch_size: int,
                              autocast: torch.autocast | None, temperature_images: int
                              ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`predict`, and per auxiliary head the (m,) learned temperatures of the first
    ``m = min(temperature_images, n)`` samples, from the same forward passes."""
    if not batch_dependent(net):
        batch_size = pass_images(batch_size, data.device)
    was_training = net.training
    net.eval()
    corrects, losses, temperatures, seen = [], [], [], 0
    try:
        for x, y in data.iterate(batch_size, indices):
            with autocast if autocast is not None else nullcontext():
                out = net(x)
            correct, loss = head_scores(out, y)
            corrects.append(correct)
            losses.append(loss)
            if seen < temperature_images:
                temperatures.append(out.temperature)
                seen += len(y)
    finally:
        net.train(was_training)
    first = [torch.cat(t)[:temperature_images] for t in zip(*temperatures)] if temperatures else []
    if not corrects:  # an empty split
        heads = 1 + net.num_aux_heads
        return (torch.zeros(heads, 0, dtype=torch.bool, device=data.device),
                torch.zeros(heads, 0, device=data.device), first)
    return torch.cat(corrects, dim=1), torch.cat(losses, dim=1), first


#: BatchNorm layers; without running statistics their eval-mode output depends on the batch
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batch_dependent(net: nn.Module) -> bool:
    """True when a prediction in eval mode depends on the other images of its batch (BatchNorm without running
    statistics normalises with the batch's own statistics)."""
    return any(isinstance(m, BATCH_NORMS) and not m.track_running_stats for m in net.modules())


@torch.no_grad()
def predict_splits(net: MultiHeadNet, data, splits: list[torch.Tensor], batch_size: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(correct, loss) of every head, (H, n_i), for each index set in ``splits``, each evaluated as its own batch
    (chunks of ``batch_size`` when longer): one plain ``net`` call per split. (Stacking equal splits into one
    ``vmap(net)`` pass was measured slower on a CPU: docs/RESULTS.md, "Evaluation against its floor".)"""
    return [predict(net, data, ix, batch_size) for ix in splits]


def head_scores(out, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, loss) of every head for one batch: (H, B) bool and float tensors (loss in float32 or wider)."""
    logits = [lg if lg.dtype in (torch.float32, torch.float64) else lg.float() for lg in (out.final, *out.aux)]
    return (torch.stack([lg.argmax(dim=1) == y for lg in logits]),
            torch.stack([F.cross_entropy(lg, y, reduction="none") for lg in logits]))


def per_client(values: torch.Tensor, owner: torch.Tensor, num_clients: int) -> torch.Tensor:
    """Per-client means of (H, n) per-sample ``values``; ``owner[i]`` is sample i's client (-1: none); NaN for a
    client without samples."""
    keep = owner >= 0
    values, owner = values[:, keep].double(), owner[keep]
    sums = torch.zeros(values.shape[0], num_clients, dtype=torch.float64, device=values.device)
    sums.index_add_(1, owner, values)
    counts = torch.bincount(owner, minlength=num_clients).double()
    return sums / counts.masked_fill(counts == 0, float("nan"))


def split_means(results: list[tuple[torch.Tensor, torch.Tensor]]) -> Scores:
    """(H, clients) accuracy and loss from per-client (correct, loss) pairs; NaN for an empty split."""
    acc = torch.stack([c.double().mean(1) for c, _ in results], dim=1)
    loss = torch.stack([lo.double().mean(1) for _, lo in results], dim=1)
    return Scores(acc.cpu().numpy(), loss.cpu().numpy())


def summarize(acc: np.ndarray, loss: np.ndarray, sizes: np.ndarray, names: list[str]) -> dict[str, float]:
    """acc/loss: (H, clients) in [0, 1]. Mean and std (ddof 0) over clients in %, and the size-weighted mean, over
    the clients with test data (``sizes > 0``); ``clients_without_test`` counts the others when there are any."""
    out: dict[str, float] = {}
    has_test = np.asarray(sizes) > 0
    acc, loss, sizes = acc[:, has_test], loss[:, has_test], np.asarray(sizes)[has_test]
    weights = sizes / sizes.sum()
    for h, name in enumerate(names):
        out[f"acc_{name}"] = float(100 * acc[h].mean())
        out[f"acc_{name}_std"] = float(100 * acc[h].std())
        out[f"acc_{name}_weighted"] = float(100 * (acc[h] * weights).sum())
        out[f"loss_{name}"] = float((loss[h] * weights).sum())
    if not has_test.all():
        out["clients_without_test"] = int((~has_test).sum())
    return out


def shared_model(runtime: "ClientRuntime", state: State) -> Scores:
    """Every client evaluated with the same model: one pass over the test set, grouped by client -- or, when the
    model's predictions depend on the batch (BatchNorm without running statistics), each client's split as its own
    batch (``predict_splits``). The scores carry the model's learned temperatures when they come from these passes
    without changing their definition: from the one pass (the per-image values of the first
    :data:`TEMPERATURE_IMAGES` test images are those of a separate pass); from the per-client passes only with
    ``federation.temperature_pass: evaluation`` (see :func:`split_temperatures`). Not under autocast:
    :func:`temperature_stats` runs without it."""
    runtime.load(state)
    n, net, data = runtime.num_clients, runtime.net, runtime.test_data
    exact = runtime.autocast is None
    if batch_dependent(net):
        if not (exact and runtime.temperature_pass == "evaluation" and net.num_aux_heads):
            return split_means(runtime.predict_each(range(n)))
        splits = [runtime.test_split(c) for c in range(n)]
        results, temperatures = split_temperatures(net, data, splits, runtime.eval_batch_size)
        return Scores(*split_means(results), temperatures=temperatures)
    wanted = min(TEMPERATURE_IMAGES, len(data)) if exact else 0
    correct, loss, temperatures = predict_with_temperatures(net, data, None, runtime.eval_batch_size,
                                                            runtime.autocast, wanted)
    return Scores(per_client(correct, runtime.test_owner, n).cpu().numpy(),
                  per_client(loss, runtime.test_owner, n).cpu().numpy(),
                  temperature_means(temperatures) if exact else None)


@torch.no_grad()
def split_temperatures(net: MultiHeadNet, data, splits: list[torch.Tensor], batch_size: int
                       ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """:func:`predict_splits` (each split its own batch), and the learned temperatures from those same passes: per
    auxiliary head the mean over the first :data:`TEMPERATURE_IMAGES` test images (by index) that belong to a split,
    each image's temperature as computed in its client's batch (``federation.temperature_pass: evaluation``; the
    reference instead passes those images as one batch of their own, :func:`temperature_stats`)."""
    owned = torch.sort(torch.cat(splits)).values if splits else torch.zeros(0, dtype=torch.long)
    if not len(owned) or not net.num_aux_heads:
        return predict_splits(net, data, splits, batch_size), {}
    last = owned[min(TEMPERATURE_IMAGES, len(owned)) - 1]
    results, sums, count = [], None, 0
    for ix in splits:
        correct, loss, temps = predict_with_temperatures(net, data, ix, batch_size, None, len(ix))
        results.append((correct, loss))
        keep = ix <= last
        picked = torch.stack([t[keep].double().sum() for t in temps]) if temps else None
        if picked is not None:
            sums = picked if sums is None else sums + picked
            count += int(keep.sum())
    means = (sums / count).tolist() if sums is not None and count else []
    return results, {f"temp_aux{i}": m for i, m in enumerate(means)}


def client_models(runtime: "ClientRuntime", model_of: Callable[[int], State]) -> Scores:
    """Client c evaluated with ``model_of(c)`` (a full state) on its own test split (NaN without test data); with
    the batched engine (``runtime.chunks``) as stacked computations of a chunk of clients each."""
    if runtime.chunks is not None:
        n, heads = runtime.num_clients, len(runtime.heads)
        acc, lss = np.zeros((heads, n)), np.zeros((heads, n))
        keys = list(runtime.initial_state)

        def score(clients: list[int]) -> None:
            models = StackedModels.stack([model_of(c) for c in clients], keys)
            acc[:, clients], lss[:, clients] = stacked_scores(runtime, models, clients)

        runtime.chunks.run(list(range(n)), score)  # a chunk that runs out of memory is scored again in halves
        return Scores(acc, lss)
    results = []
    for c in range(runtime.num_clients):
        runtime.load(model_of(c))
        results.append(runtime.predict(c))
    return split_means(results)


@torch.no_grad()
def stacked_scores(runtime: "ClientRuntime", models: StackedModels, clients: list[int]) -> Scores:
    """Accuracy and loss of every head, two (H, len(clients)) arrays: model k of ``models`` on the test split of
    ``clients[k]``, as vmapped passes over clients with equal test-split sizes, in the chunks of
    ``federation.eval_batch_size`` that :func:`predict` uses (so BatchNorm without running statistics sees the same
    batches as client-by-client evaluation). A pass takes as many such clients as keep it within
    :func:`pass_images` images (at least one client), so memory does not grow with the number of clients."""
    heads = len(runtime.heads)
    acc, lss = np.full((heads, len(clients)), np.nan), np.full((heads, len(clients)), np.nan)
    data, net, bs = runtime.test_data, runtime.net, runtime.eval_batch_size
    limit = pass_images(bs, data.device)
    by_size: dict[int, list[int]] = {}
    for k, c in enumerate(clients):
        if runtime.test_sizes[c]:
            by_size.setdefault(int(runtime.test_sizes[c]), []).append(k)
    passes = []  # (split size, positions in clients): clients of one size, at most `limit` images per pass
    for size, ks in by_size.items():
        per_pass = max(1, limit // min(size, bs))
        passes += [(size, ks[i:i + per_pass]) for i in range(0, len(ks), per_pass)]
    was_training = net.training
    net.eval()
    try:
        for size, ks in passes:
            group = models if len(ks) == len(clients) else models.select(torch.as_tensor(ks, device=data.device))
            index = torch.stack([runtime.test_split(clients[k]) for k in ks])  # (G, n)
            correct = torch.zeros(heads, len(ks), dtype=torch.float64, device=data.device)
            loss = torch.zeros_like(correct)
            for lo in range(0, size, bs):
                sel = index[:, lo:lo + bs]
                g, b = sel.shape
                x = data.normalise(data.images[sel.reshape(-1)]).view(g, b, *data.images.shape[1:])
                y = data.labels[sel]
                with runtime.autocast if runtime.autocast is not None else nullcontext():
                    out = stacked_forward(net, group, x)
                flat = type(out)(*[t.reshape(g * b, *t.shape[2:]) if isinstance(t, torch.Tensor)
                                   else tuple(u.reshape(g * b, *u.shape[2:]) for u in t) for t in out])
                hit, lo_ss = head_scores(flat, y.reshape(-1))
                correct += hit.view(heads, g, b).double().sum(2)
                loss += lo_ss.view(heads, g, b).double().sum(2)
            acc[:, ks] = (correct / size).cpu().numpy()
            lss[:, ks] = (loss / size).cpu().numpy()
    finally:
        net.train(was_training)
    return Scores(acc, lss)


def client_accuracy(runtime: "ClientRuntime", client: int) -> float:
    """Final-head accuracy in [0, 1] of the network's current weights on ``client``'s test split."""
    correct, _ = runtime.predict(client)
    return float(correct[0].double().mean())


@torch.no_grad()
def temperature_stats(runtime: "ClientRuntime", state: State) -> dict[str, float]:
    """Mean learned temperature sigmoid(s) of each auxiliary head of ``state`` on the first (up to
    :data:`TEMPERATURE_IMAGES`) test images, as one batch."""
    runtime.load(state)
    net = runtime.net
    if not net.num_aux_heads:
        return {}
    was_training = net.training
    net.eval()
    try:
        x, _ = next(iter(runtime.test_data.iterate(min(TEMPERATURE_IMAGES, len(runtime.test_data)))))
        out = net(x)
    finally:
        net.train(was_training)
    return temperature_means(out.temperature)


def temperature_means(temperatures) -> dict[str, float]:
    """``{temp_aux<i>: mean}`` of per-image temperatures, one (n,) tensor per auxiliary head; one transfer."""
    if not temperatures:
        return {}
    means = torch.stack([t.mean() for t in temperatures]).tolist()
    return {f"temp_aux{i}": m for i, m in enumerate(means)}

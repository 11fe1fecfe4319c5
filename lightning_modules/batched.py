"""The batched engine: K clients' local updates as one computation (``torch.func``).

:func:`batched_local_update` runs what ``MultiHeadClassifier.local_update`` runs for one client, for K clients at
once: their parameters and buffers are stacked along a leading client dimension, every step is one
``vmap(grad(functional_call))`` forward/backward over a ``(K, B, ...)`` batch, and one SGD step updates the stacked
tensors. What it keeps exact, and how:

* **BatchNorm**: each client normalises with its own batch statistics and updates its own running statistics (the
  stacked buffers are cloned inside the vmapped function, updated there by BatchNorm, and returned as its output).
* **SGD** as ``torch.optim.SGD`` (momentum, dampening 0, weight decay, no Nesterov) per client: momentum buffers
  start at zero every call (the reference builds a fresh optimizer per client-round); only the trainable part is in
  the optimizer, so frozen parts never change, gradients still flow through them.
* **Clients of different sizes** (Dirichlet partitions, remainder batches): at every step the clients that still
  have a batch are grouped by batch size, and each group is one vmapped step over exactly those clients; a finished
  client's parameters, buffers and momentum are left untouched (its *whole* update is masked out, not only its
  loss). Padding instead would change the BatchNorm batch statistics of the padded client.
* **Batches** are the clients' own streams (the same iterators the sequential engine consumes).

The result equals K sequential ``local_update`` calls up to floating-point reassociation (float64: ~1e-12 relative;
tests/test_batched.py). ``compile`` wraps the vmapped step in ``torch.compile`` (``batched.compile`` in the config:
a mode name, compiled once per module, loss and precision and reused across rounds; ``reduce-overhead`` = CUDA graphs
on a GPU, whose outputs are copied before the next replay). What cannot be batched this way -- per-step hooks (Ditto's proximal term, Per-FedAvg's
meta-steps), two-phase updates (FedRep) -- is refused by the orchestrator at config validation.
"""
from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from fl_sd.losses import LossConfig, MultiHeadLoss
from fl_sd.stacked import StackedModels

from .client import ClientUpdate, MultiHeadClassifier, NonFiniteLossError

State = Mapping[str, Tensor]
Batch = tuple[Tensor, Tensor]


#: ``batched.compile``: off = eager; otherwise the ``torch.compile`` mode of the vmapped step
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
#: per module: (loss, autocast, mode, backend) -> the compiled step (compiling is slow; rounds reuse it)
_COMPILED_STEPS: "weakref.WeakKeyDictionary[MultiHeadClassifier, dict]" = weakref.WeakKeyDictionary()


class ClientFailed(FloatingPointError):
    """A client of a batched update produced a NaN/Inf loss; ``index`` is its position in the call's lists."""

    def __init__(self, index: int, error: NonFiniteLossError):
        self.index, self.error = index, error
        super().__init__(str(error))


def batched_local_update(
    module: MultiHeadClassifier,
    starts: Sequence[State],
    batches: Sequence[Iterable[Batch]],
    *,
    train_part: str | None = None,
    lr: float | None = None,
    head_lr: float | None = None,
    loss: LossConfig | MultiHeadLoss | None = None,
    return_head: bool = False,
    num_samples: Sequence[int | None] | None = None,
    steps_per_epoch: Sequence[int] | None = None,
    on_epoch_end: Callable[[list[tuple[int, int]], StackedModels], None] | None = None,
    autocast: torch.autocast | None = None,
    momentum: float | None = None,
    compile: str = "off",
    compile_backend: str = "inductor",
) -> list[ClientUpdate]:
    """K local updates at once: client k starts from the full state ``starts[k]`` and takes one SGD step per batch of
    ``batches[k]``; returns K :class:`~lightning_modules.client.ClientUpdate` in order.

    ``train_part``, ``lr``, ``head_lr``, ``loss`` mean what they mean in ``MultiHeadClassifier.local_update`` (the same
    for every client of the call). ``on_epoch_end(done, models)`` (requires ``steps_per_epoch[k]`` for every client)
    is called after a step that completed an epoch of some clients: ``done`` lists ``(k, epoch)`` (1-based epoch) and
    ``models`` holds the current stacked states (parameters and buffers; read them, do not write them). The module's
    own weights are not touched. Raises :class:`ClientFailed` for the first client whose loss was NaN/Inf.
    ``compile`` (one of :data:`COMPILE_MODES`) compiles the vmapped step with ``torch.compile`` (``compile_backend``:
    inductor; tests use aot_eager, which traces the same graph without generating code).
    """
    k_clients = len(starts)
    if k_clients == 0 or len(batches) != k_clients:
        raise ValueError(f"batched_local_update needs as many batch streams as starts (>= 1), got {len(batches)} for "
                         f"{k_clients}")
    if on_epoch_end is not None and (steps_per_epoch is None or len(steps_per_epoch) != k_clients
                                     or min(steps_per_epoch) < 1):
        raise ValueError("on_epoch_end needs steps_per_epoch >= 1 for every client")
    part, body_lr, head_lr, loss_fn = module.update_settings(train_part, lr, head_lr, loss)
    net = module.net
    param_names = [n for n, _ in net.named_parameters()]
    trainable: dict[str, float] = {}
    for group, group_lr in (("body", body_lr), ("head", head_lr)):
        if part in (group, "full"):
            trainable.update({n: group_lr for n, _ in net.named_part_parameters(group)})
    frozen_names = [n for n in param_names if n not in trainable]
    buffer_names = [n for n in net.state_dict() if n not in set(param_names)]
    train_names = list(trainable)
    if not train_names:
        raise ValueError(f"train_part {part!r} has no parameters in {type(net).__name__}")
    params = {n: torch.stack([s[n] for s in starts]).detach().clone() for n in train_names}
    frozen = {n: torch.stack([s[n] for s in starts]).detach() for n in frozen_names}
    buffers = {n: torch.stack([s[n] for s in starts]).detach().clone() for n in buffer_names}
    momentum = module.momentum if momentum is None else float(momentum)  # None: the module's
    weight_decay = module.weight_decay
    moment = {n: torch.zeros_like(p) for n, p in params.items()} if momentum else {}
    lrs_by_value: dict[float, list[str]] = {}
    for n in train_names:
        lrs_by_value.setdefault(trainable[n], []).append(n)

    step_fn = _step_function(module, loss_fn, autocast, compile, compile_backend)
    streams: list[Iterator[Batch] | None] = [iter(b) for b in batches]
    records: list[list[Tensor]] = [[] for _ in range(k_clients)]
    processed = [0] * k_clients
    steps_done = [0] * k_clients
    device = next(net.parameters()).device
    was_training = net.training
    net.train()
    try:
        while True:
            groups: dict[tuple, list[tuple[int, Batch]]] = {}
            for k, stream in enumerate(streams):
                if stream is None:
                    continue
                batch = next(stream, None)
                if batch is None:
                    streams[k] = None
                    continue
                x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                groups.setdefault(tuple(x.shape), []).append((k, (x, y)))
            if not groups:
                break
            for members in groups.values():
                ks = [k for k, _ in members]
                x = torch.stack([b[0] for _, b in members])
                y = torch.stack([b[1] for _, b in members])
                _step(step_fn, ks, k_clients, x, y, params, frozen, buffers, moment, lrs_by_value, momentum,
                      weight_decay, records, device)
                for k, (_, (_, yk)) in zip(ks, members):
                    processed[k] += yk.shape[0]
                    steps_done[k] += 1
            if on_epoch_end is not None:
                stepped = [k for members in groups.values() for k, _ in members]
                done = sorted((k, steps_done[k] // steps_per_epoch[k]) for k in stepped
                              if steps_done[k] % steps_per_epoch[k] == 0)
                if done:
                    on_epoch_end(done, StackedModels({**params, **frozen, **buffers}))
                    net.train()
    finally:
        net.train(was_training)
    if not any(records):
        raise ValueError("batched_local_update got no batches")
    body_keys, head_keys = net.body_state_keys(), net.head_state_keys()
    full = {**params, **frozen, **buffers}
    updates = []
    for k in range(k_clients):
        if not records[k]:
            raise ValueError(f"batched_local_update: client {k} got no batches")
        try:
            metrics = module.summarise_steps(records[k], processed[k])
        except NonFiniteLossError as err:
            raise ClientFailed(k, err) from None
        n = None if num_samples is None else num_samples[k]
        updates.append(ClientUpdate(
            body_state={key: full[key][k] for key in body_keys},
            head_state={key: full[key][k] for key in head_keys} if return_head else None,
            num_samples=processed[k] if n is None else int(n), num_steps=len(records[k]), metrics=metrics))
    return updates


def _step_function(module: MultiHeadClassifier, loss_fn: MultiHeadLoss, autocast: torch.autocast | None,
                   compile: str, backend: str) -> Callable:
    """The vmapped per-client gradient step ``(params, frozen, buffers, x, y) -> (grads, (buffers, record))``; with
    ``compile`` other than off, the ``torch.compile``d one of this (module, loss, autocast, mode, backend)."""
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {compile!r}")
    net = module.net

    def loss_of(p, f, b, x, y):
        b = {key: value.clone() for key, value in b.items()}  # BatchNorm updates these in place
        with autocast if autocast is not None else nullcontext():
            out = functional_call(net, {**p, **f, **b}, (x,))
            losses = loss_fn(out, y)
        return losses.total, (b, module.step_record(losses, out, y))

    step_fn = vmap(grad(loss_of, has_aux=True))
    if compile == "off":
        return step_fn
    cache = _COMPILED_STEPS.setdefault(module, {})
    key = (id(loss_fn), id(autocast), compile, backend)
    if key not in cache:
        kwargs = {"mode": compile} if backend == "inductor" else {}
        compiled = torch.compile(step_fn, backend=backend, **kwargs)
        if compile == "reduce-overhead":
            compiled = _fresh_outputs(compiled)
        cache[key] = (compiled, loss_fn, autocast)  # the references keep the ids of the key unique
    return cache[key][0]


def _fresh_outputs(compiled: Callable) -> Callable:
    """CUDA-graph replays overwrite their outputs: mark a new step before each call and copy what it returns."""

    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, compiled(*args))

    return call


def _step(step_fn, ks, k_clients, x, y, params, frozen, buffers, moment, lrs_by_value, momentum, weight_decay,
          records, device) -> None:
    """One vmapped SGD step of the clients ``ks`` (all of them: on the stacked tensors in place; a subset: gathered,
    stepped, scattered back)."""
    everyone = len(ks) == k_clients
    if everyone:
        p, f, b, m = params, frozen, buffers, moment
    else:
        index = torch.as_tensor(ks, device=device)
        p = {n: v.index_select(0, index) for n, v in params.items()}
        f = {n: v.index_select(0, index) for n, v in frozen.items()}
        b = {n: v.index_select(0, index) for n, v in buffers.items()}
        m = {n: v.index_select(0, index) for n, v in moment.items()}
    with torch.no_grad():
        grads, (new_buffers, record) = step_fn(p, f, b, x, y)
        for group_lr, names in lrs_by_value.items():
            ps, gs = [p[n] for n in names], [grads[n] for n in names]
            if weight_decay:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            if momentum:
                ms = [m[n] for n in names]
                torch._foreach_mul_(ms, momentum)
                torch._foreach_add_(ms, gs)
                gs = ms
            torch._foreach_add_(ps, gs, alpha=-group_lr)
        if everyone:
            for n, value in new_buffers.items():
                buffers[n].copy_(value)
        else:
            for target, source in ((params, p), (moment, m), (buffers, new_buffers)):
                for n, value in source.items():
                    target[n].index_copy_(0, index, value)
    for row, k in enumerate(ks):
        records[k].append(record[row])

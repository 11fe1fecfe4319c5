"""Ditto (Li et al., 2021): FedBABU's ``main_ditto.py`` (the reference protocol) and Ditto's own definition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fl_sd.hooks import StepHooks, named_params

from .. import evaluation
from ..errors import OptionError
from .base import Algorithm, register_algorithm, select_part
from .options import AlgorithmOptions

#: Seed stream of the personal model's batches in the reference protocol (its own shuffled loader).
PERSONAL_STREAM = 4_000_037


@dataclass
class DittoOptions(AlgorithmOptions):
    #: lambda of the proximal term, 0.75 as FedBABU's code ("follows FedRep")
    lam: float = 0.75
    #: reference = FedBABU's code (see the class); persistent = Ditto's definition: personal models persist across
    #: rounds, the pull towards the round's global model is part of the gradient, the global model is the mean of
    #: the local copies of the global model
    protocol: Literal["reference", "persistent"] = "reference"
    #: (persistent only) start every selected client's personal model from the round's global model
    reset_personal: bool = False

    def validate(self) -> None:
        if not self.lam >= 0:
            raise OptionError("lam", f"must be a number >= 0, got {self.lam}")
        if self.reset_personal and self.protocol != "persistent":
            raise OptionError("reset_personal", "applies to protocol: persistent only (the reference protocol "
                                                "always starts from the round's global model)")


class ProximalGradient(StepHooks):
    """Adds ``lam * (w - anchor)`` to every trained parameter's gradient before the step: minimises
    L(w) + lam/2 ||w - anchor||^2."""

    def __init__(self, lam: float, anchor: dict[str, torch.Tensor]):
        self.lam, self.anchor = float(lam), anchor

    @torch.no_grad()
    def before_step(self, step, optimizer):
        for name, p, _ in named_params(optimizer):
            pull = self.lam * (p - self.anchor[name])
            if p.grad is None:
                p.grad = pull.clone()
            else:
                p.grad.add_(pull)
        return False


class ProximalPullAfterStep(StepHooks):
    """FedBABU's ``LocalUpdateDitto``: after each (momentum) SGD step, ``w <- w - lr * lam * (w_before - anchor)``
    with ``w_before`` the weights before that step and ``lr`` the group's learning rate."""

    def __init__(self, lam: float, anchor: dict[str, torch.Tensor]):
        self.lam, self.anchor = float(lam), anchor
        self.before: list[torch.Tensor] = []

    @torch.no_grad()
    def before_step(self, step, optimizer):
        self.before = [p.detach().clone() for _, p, _ in named_params(optimizer)]
        return False

    @torch.no_grad()
    def after_step(self, step, optimizer):
        for (name, p, group), w0 in zip(named_params(optimizer), self.before):
            p.sub_(group["lr"] * self.lam * (w0 - self.anchor[name]))


@register_algorithm
class Ditto(Algorithm):
    """Ditto: every selected client trains a local copy w_k of the global model (plain local SGD, the whole
    network) and a personal model v pulled towards a proximal anchor with weight ``lam``.

    Reference protocol (default, FedBABU's ``main_ditto.py``): the personal model starts from the round's global model
    (every round ends by overwriting all personal models with the global); it trains on its own shuffle of the
    client's data and after every momentum step is pulled towards w_k, ``v <- v - lr * lam * (v_before - w_k)``; the
    server's new global model is the mean of the PERSONAL models; at an evaluation the clients selected in the last
    round are tested with their personal model, all others with the global model from before that round (what their
    local copy held). Paper configs keep the learning rate constant, as FedBABU's code (lr_milestones: []).

    ``protocol: persistent`` (Ditto's definition): personal models persist across rounds (``reset_personal`` starts
    them from the round's global instead), their proximal term ``lam * (v - w)`` towards the round's global model w is
    part of the gradient, the global model is the mean of the local copies w_k, and a client is evaluated and
    personalised with its personal model (a never-selected client: the global model).
    """

    name = "ditto"
    description = "FedAvg + per-client personal models pulled toward the global (lambda)"
    Options = DittoOptions
    loss = "ce"
    train_part = "full"
    aggregate = "full"
    keeps_part = "full"

    def __init__(self, options=None):
        super().__init__(options)
        #: (reference) the clients of the last round and the global model from before it
        self.last_selected: list[int] = []
        self.previous_global: dict[str, torch.Tensor] | None = None

    @property
    def needs_round_start_state(self) -> bool:
        return self.options.protocol == "reference"

    def client_update(self, ctx, job, global_state, batches):
        if self.options.protocol == "reference":
            return self._reference_update(ctx, job, global_state, batches)
        batches = list(batches)  # used twice: the global copy and the personal model see the same batches
        n = ctx.num_train_samples(job.client)
        update = ctx.train(batches, start=global_state, part="full", lr=job.lr, loss=ctx.train_loss,
                           return_head=True, num_samples=n)
        start = global_state if job.own_state is None or self.options.reset_personal else job.own_state
        personal = ctx.train(batches, start=start, part="full", lr=job.lr, loss=ctx.train_loss, return_head=True,
                             hooks=ProximalGradient(self.options.lam, global_state))
        update.metrics["personal_loss"] = personal.metrics["loss"]
        return update, select_part(personal, "full")

    def _reference_update(self, ctx, job, global_state, batches):
        n = ctx.num_train_samples(job.client)
        local = ctx.train(batches, start=global_state, part="full", lr=job.lr, loss=ctx.train_loss,
                          return_head=True, num_samples=n)
        anchor = select_part(local, "full")
        personal = ctx.train(ctx.batches(job.client, job.round, ctx.local_epochs, stream=PERSONAL_STREAM),
                             start=global_state, part="full", lr=job.lr, loss=ctx.train_loss, return_head=True,
                             hooks=ProximalPullAfterStep(self.options.lam, anchor), num_samples=n)
        personal.metrics["local_loss"] = local.metrics["loss"]
        return personal, select_part(personal, "full")

    # -- server side: who was in the last round, and the global model before it -------------------------------------
    def end_round(self, round_idx, selected, round_start_state):
        if self.options.protocol == "reference":
            self.last_selected, self.previous_global = list(selected), round_start_state

    def state_dict(self):
        return {"last_selected": list(self.last_selected), "previous_global": self.previous_global}

    def load_state_dict(self, state, device):
        self.last_selected = [int(c) for c in state.get("last_selected", [])]
        previous = state.get("previous_global")
        self.previous_global = None if previous is None else {k: v.to(device) for k, v in previous.items()}

    def evaluate(self, ctx, base_state, store, round_idx, lr):
        if self.options.protocol != "reference":
            return super().evaluate(ctx, base_state, store, round_idx, lr)
        previous = base_state if self.previous_global is None else self.previous_global
        last = set(self.last_selected)
        return evaluation.client_models(ctx, lambda c: store[c] if c in last and c in store else previous)

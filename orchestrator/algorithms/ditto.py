"""Ditto (Li et al., 2021) as FedBABU's ``main_ditto.py`` runs it (SPEC 9.1), with its personal models kept."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_sd.hooks import StepHooks, named_params

from ..errors import OptionError
from .base import Algorithm, register_algorithm, select_part
from .options import AlgorithmOptions


@dataclass
class DittoOptions(AlgorithmOptions):
    #: lambda of the proximal term, 0.75 as FedBABU's code ("follows FedRep")
    lam: float = 0.75
    #: start every selected client's personal model from the round's global model (FedBABU's per-round reset)
    reset_personal: bool = False

    def validate(self) -> None:
        if not self.lam >= 0:
            raise OptionError("lam", f"must be a number >= 0, got {self.lam}")


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


@register_algorithm
class Ditto(Algorithm):
    """Ditto: every selected client (1) trains the global model w locally (plain local SGD, the whole network); the
    server averages these local models into the next global model (FedAvg); and (2) trains its own personal model v
    with the same batches and the same SGD, its gradient plus the proximal pull ``lam * (v - w)`` toward the round's
    global model w, i.e. it minimises L(v) + lam/2 ||v - w||^2. Personal models persist across rounds (the client
    keeps its whole model); a client is evaluated and personalised with its personal model (a client never selected:
    the global model).

    ``reset_personal: true`` starts every selected client's personal model from the round's global model instead of
    its own, i.e. personal models do not persist across rounds -- what FedBABU's code does by overwriting them all
    with the global at the end of every round (a defect); only to reproduce its numbers.

    Differences from FedBABU's code: it adds the pull after the momentum step, ``v -= lr0 * lam * (v_before - w)`` with
    the initial lr; here it is part of the gradient the optimizer sees (the same for plain SGD). Its global model is
    the average of the personal models; here of the local copies of the global model (Ditto's definition). Its
    training ignores the learning-rate decay (configs/paper/ditto reproduce that with lr_milestones: []).
    """

    name = "ditto"
    description = "FedAvg + per-client personal models pulled toward the global (lambda)"
    Options = DittoOptions
    loss = "ce"
    train_part = "full"
    aggregate = "full"
    keeps_part = "full"

    def client_update(self, ctx, job, global_state, batches):
        batches = list(batches)  # used twice: the global copy and the personal model see the same batches
        n = ctx.num_train_samples(job.client)
        update = ctx.train(batches, start=global_state, part="full", lr=job.lr, loss=ctx.train_loss,
                           return_head=True, num_samples=n)
        start = global_state if job.own_state is None or self.options.reset_personal else job.own_state
        personal = ctx.train(batches, start=start, part="full", lr=job.lr, loss=ctx.train_loss, return_head=True,
                             hooks=ProximalGradient(self.options.lam, global_state))
        update.metrics["personal_loss"] = personal.metrics["loss"]
        return update, select_part(personal, "full")

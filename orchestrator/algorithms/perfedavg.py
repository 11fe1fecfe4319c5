"""Per-FedAvg (Fallah et al., 2020), first-order MAML, as FedBABU's ``main_per_fedavg.py`` runs it (SPEC 9.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fl_sd.hooks import StepHooks

from ..errors import OptionError
from .base import Algorithm, register_algorithm, select_part
from .context import ClientJob
from .options import AlgorithmOptions

#: Seed stream of the adaptation batch (apart from training's and fine-tuning's batches).
ADAPT_STREAM = 3_000_017


@dataclass
class PerFedAvgOptions(AlgorithmOptions):
    #: the outer (meta) learning rate, 0.1 as FedBABU's code
    beta: float = 0.1
    #: adapt on a batch of the client's own train split, or (leaks test labels) of its test split
    adapt_on: Literal["train", "test"] = "train"

    def validate(self) -> None:
        if not self.beta > 0:
            raise OptionError("beta", f"must be a number > 0, got {self.beta}")


class FirstOrderMetaSteps(StepHooks):
    """Steps in pairs: on even steps the inner update w' = w - alpha grad L_1(w) (plain SGD at the groups' learning
    rates; the optimizer does not step), on odd steps the gradient grad L_2(w') is applied to w by the optimizer at
    ``beta``. Only the outer steps count in the metrics."""

    def __init__(self, beta: float):
        self.beta = float(beta)
        self.alphas: list[float] | None = None
        self.saved: list[torch.Tensor] = []

    @torch.no_grad()
    def before_step(self, step, optimizer):
        groups = optimizer.param_groups
        if self.alphas is None:
            self.alphas = [g["lr"] for g in groups]
            for g in groups:
                g["lr"] = self.beta
        params = [p for g in groups for p in g["params"]]
        if step % 2 == 0:
            self.saved = [p.detach().clone() for p in params]
            for g, alpha in zip(groups, self.alphas):
                for p in g["params"]:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=alpha)
            return True
        for p, w in zip(params, self.saved):  # the gradient was taken at w'; the step applies it to w
            p.copy_(w)
        return False

    def record(self, step):
        return step % 2 == 1


@register_algorithm
class PerFedAvg(Algorithm):
    """Per-FedAvg (first-order): the round's batches are used in pairs. For each pair, from the current weights w,
    an inner SGD step on batch 1 at the round's learning rate alpha gives w' = w - alpha grad L_1(w); the gradient on
    batch 2 taken at w', grad L_2(w'), is then applied to w (not to w') by an outer SGD optimizer at ``beta``:
    w <- w - beta grad L_2(w') (the outer optimizer carries ``federation.momentum`` across pairs; the inner step is
    plain SGD). The whole model is averaged.

    A client's personalised model is the global model after one SGD step (alpha = the learning rate of the round after
    the one that produced the model, as FedBABU's code) on one batch of ITS OWN TRAINING data -- the paper's
    definition; it is what the client is evaluated with and what personalisation fine-tunes from. ``adapt_on: test``
    takes that step on a batch of the client's TEST split: it leaks test labels into the model that is then tested and
    exists only to study published numbers.

    Differences from FedBABU's code: it runs tau x (int(batches/tau) + 1) pairs per round, drawing batches round-robin
    from the loader; here every batch of the round is used once (tau x batches / 2 pairs; with an odd count the last
    batch pairs with the first). It shares one momentum SGD between the inner and the outer step, so the inner
    gradient leaks into the outer update; here the inner step is plain SGD. Its adaptation (``one_sgd_step``) takes an
    alpha step and then a beta step on two batches of ANOTHER client's test split; here one alpha step.
    """

    name = "perfedavg"
    description = "first-order MAML: inner step on batch 1, outer step on batch 2 from the pre-inner weights"
    Options = PerFedAvgOptions
    loss = "ce"
    train_part = "full"
    aggregate = "full"

    def client_update(self, ctx, job, global_state, batches):
        batches = list(batches)
        if len(batches) % 2:
            batches.append(batches[0])
        update = ctx.train(batches, start=global_state, part="full", lr=job.lr, loss=ctx.train_loss,
                           hooks=FirstOrderMetaSteps(self.options.beta), return_head=True,
                           num_samples=ctx.num_train_samples(job.client))
        return update, None

    # -- the personalised model: one adaptation step ---------------------------------------------------------------
    @property
    def per_client_models(self) -> bool:
        return True

    def adaptation_batch(self, ctx, client: int, round_idx: int):
        """The client's adaptation batch for the model after ``round_idx`` rounds, seeded by (seed, round, client);
        None for a client without data."""
        return next(iter(ctx.batches(client, round_idx, 1, stream=ADAPT_STREAM, split=self.options.adapt_on)), None)

    def client_model(self, ctx, job: ClientJob, base_state):
        batch = self.adaptation_batch(ctx, job.client, job.round)
        if batch is None:
            return base_state
        adapted = ctx.train([batch], start=base_state, part="full", lr=job.lr, loss=ctx.train_loss, return_head=True)
        return select_part(adapted, "full")

"""Per-FedAvg (Fallah et al., 2020), first-order MAML, as FedBABU's ``main_per_fedavg.py`` runs it (SPEC 9.1)."""
from __future__ import annotations

import itertools
import math
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
    #: how a client's personalised model is made from the global one before it is tested (and fine-tuned):
    #: reference = FedBABU's code: one alpha step then one beta step (one momentum SGD) on two batches of the TEST
    #: split of the last client sampled in the round (leaks test data, and uses another client's data);
    #: train = one alpha step on a batch of the client's own train split (Per-FedAvg's definition; recommended);
    #: test = that step on a batch of its own test split (leaks test labels)
    adapt: Literal["reference", "train", "test"] = "reference"
    #: reference = tau x (floor(B / tau) + 1) meta-step pairs per round (B batches per epoch) from consecutive
    #: batches, inner and outer step through one momentum SGD (FedBABU's code); paired_batches = every batch of the
    #: round once, in pairs, the inner step plain SGD
    meta_steps: Literal["reference", "paired_batches"] = "reference"

    def validate(self) -> None:
        if not self.beta > 0:
            raise OptionError("beta", f"must be a number > 0, got {self.beta}")


class MetaStepPairs(StepHooks):
    """Local steps in pairs (inner, outer) from the current weights w: the even step saves w and moves to w', the odd
    step's gradient was taken at w' and is applied to the restored w. ``alphas`` are the groups' learning rates at the
    first step (the inner step size); only the outer steps count in the metrics."""

    def __init__(self, beta: float):
        self.beta = float(beta)
        self.alphas: list[float] | None = None
        self.saved: list[torch.Tensor] = []

    def start_pair(self, optimizer) -> list[torch.Tensor]:
        """Remember the inner learning rates (on the first call); the parameters of every group, in order."""
        if self.alphas is None:
            self.alphas = [g["lr"] for g in optimizer.param_groups]
        return [p for g in optimizer.param_groups for p in g["params"]]

    def save(self, params: list[torch.Tensor]) -> None:
        self.saved = [p.detach().clone() for p in params]

    def restore(self, params: list[torch.Tensor]) -> None:
        for p, w in zip(params, self.saved):
            p.copy_(w)

    def record(self, step):
        return step % 2 == 1


class SharedMomentumMetaSteps(MetaStepPairs):
    """FedBABU's ``LocalUpdatePerFedAvg.train``: the pairs go through ONE momentum SGD. Even step: save w, step at
    the groups' learning rate alpha (w' = w - alpha m_1). Odd step: restore w, step at ``beta`` (the momentum buffer
    carries the inner gradient)."""

    @torch.no_grad()
    def before_step(self, step, optimizer):
        params = self.start_pair(optimizer)
        groups = optimizer.param_groups
        if step % 2 == 0:
            self.save(params)
            for g, alpha in zip(groups, self.alphas):
                g["lr"] = alpha
            return False
        self.restore(params)
        for g in groups:
            g["lr"] = self.beta
        return False


class AlphaThenBeta(StepHooks):
    """FedBABU's ``one_sgd_step``: step 0 at the groups' learning rate (alpha), step 1 at ``beta``, one momentum SGD."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def before_step(self, step, optimizer):
        if step == 1:
            for g in optimizer.param_groups:
                g["lr"] = self.beta
        return False


class FirstOrderMetaSteps(MetaStepPairs):
    """Even steps: the inner update w' = w - alpha grad L_1(w) by hand (plain SGD at the groups' learning rates; the
    optimizer does not step); odd steps: the gradient grad L_2(w') is applied to w by the optimizer at ``beta``."""

    @torch.no_grad()
    def before_step(self, step, optimizer):
        first = self.alphas is None
        params = self.start_pair(optimizer)
        groups = optimizer.param_groups
        if first:
            for g in groups:
                g["lr"] = self.beta
        if step % 2 == 0:
            self.save(params)
            for g, alpha in zip(groups, self.alphas):
                for p in g["params"]:
                    if p.grad is not None:
                        p.sub_(p.grad, alpha=alpha)
            return True
        self.restore(params)  # the gradient was taken at w'; the step applies it to w
        return False


@register_algorithm
class PerFedAvg(Algorithm):
    """Per-FedAvg (first-order MAML): meta-step pairs. For each pair, from the current weights w, an inner step on
    batch 1 at the round's learning rate alpha gives w'; the gradient on batch 2 taken at w' is then applied to w (not
    to w') at ``beta``. The whole model is averaged. Before a client is tested (and fine-tuned) the global model is
    adapted into its personalised model (alpha = the learning rate of the round after the one that produced the
    model, as FedBABU's code).

    Reference protocol (defaults, FedBABU's ``main_per_fedavg.py``): ``meta_steps: reference`` runs tau x (floor(B /
    tau) + 1) pairs per round (B batches per epoch: 11/12/20 for tau = 1/4/10 with 10 batches) from consecutive
    shuffled epochs, inner and outer step through one momentum SGD (the inner gradient enters the momentum buffer);
    ``adapt: reference`` adapts every client with one alpha step then one beta step (one momentum SGD) on the first
    two batches of the TEST split of the last client sampled in the round -- it leaks test data and uses another
    client's data, and is kept only to reproduce the published column. (FedBABU restarts its loader at each of the
    tau inner loops; here the batches run on across epochs; every client adapts on the same two batches.)

    Recommended: ``adapt: train`` -- one alpha step on a batch of the client's OWN training data, Per-FedAvg's
    definition (``adapt: test``: on its own test split, a leak); ``meta_steps: paired_batches`` uses every batch of
    the round once (with an odd count the last pairs with the first) with a plain-SGD inner step.
    """

    name = "perfedavg"
    description = "first-order MAML: inner step on batch 1, outer step on batch 2 from the pre-inner weights"
    Options = PerFedAvgOptions
    loss = "ce"
    train_part = "full"
    aggregate = "full"

    def __init__(self, options=None):
        super().__init__(options)
        #: round index -> the last client sampled in it (the reference's ``idx`` after the round's loop)
        self.last_sampled: dict[int, int] = {}

    def client_update(self, ctx, job, global_state, batches):
        n = ctx.num_train_samples(job.client)
        if self.options.meta_steps == "reference":
            per_epoch = math.ceil(n / ctx.batch_size)
            steps = 2 * ctx.local_epochs * (per_epoch // ctx.local_epochs + 1)
            stream = ctx.batches(job.client, job.round, math.ceil(steps / per_epoch))
            batches, hooks = list(itertools.islice(stream, steps)), SharedMomentumMetaSteps(self.options.beta)
        else:
            batches, hooks = list(batches), FirstOrderMetaSteps(self.options.beta)
            if len(batches) % 2:
                batches.append(batches[0])
        update = ctx.train(batches, start=global_state, part="full", lr=job.lr, loss=ctx.train_loss, hooks=hooks,
                           return_head=True, num_samples=n)
        return update, None

    # -- server-side memory: the last client sampled in every round (the reference adapts on its test split) ------
    def end_round(self, round_idx, selected, round_start_state):
        self.last_sampled[round_idx] = selected[-1]

    def state_dict(self):
        return {"last_sampled": dict(self.last_sampled)}

    def load_state_dict(self, state, device):
        self.last_sampled = {int(r): int(c) for r, c in state.get("last_sampled", {}).items()}

    # -- the personalised model: adaptation steps ------------------------------------------------------------------
    @property
    def per_client_models(self) -> bool:
        return True

    def adaptation_batches(self, ctx, client: int, round_idx: int) -> list:
        """The batches ``client`` adapts the model after ``round_idx`` rounds on, seeded by (seed, round, client);
        empty when there is nothing to adapt on. reference: the first two batches (cycling) of the test split of the
        last client sampled in round ``round_idx - 1``; train/test: one batch of the client's own split."""
        if self.options.adapt == "reference":
            source = self.last_sampled.get(round_idx - 1)
            if source is None:
                return []
            return list(itertools.islice(ctx.batches(source, round_idx, 2, stream=ADAPT_STREAM, split="test"), 2))
        return list(itertools.islice(ctx.batches(client, round_idx, 1, stream=ADAPT_STREAM,
                                                 split=self.options.adapt), 1))

    def adaptation_batch(self, ctx, client: int, round_idx: int):
        """The first adaptation batch (None: none)."""
        batches = self.adaptation_batches(ctx, client, round_idx)
        return batches[0] if batches else None

    def client_model(self, ctx, job: ClientJob, base_state):
        batches = self.adaptation_batches(ctx, job.client, job.round)
        if not batches:
            return base_state
        hooks = AlphaThenBeta(self.options.beta) if self.options.adapt == "reference" else None
        adapted = ctx.train(batches, start=base_state, part="full", lr=job.lr, loss=ctx.train_loss, hooks=hooks,
                            return_head=True)
        return select_part(adapted, "full")

"""FedRep (Collins et al., 2021) as FedBABU's ``main_fedrep.py`` runs it (SPEC 9.1, BASELINES "FedRep")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fl_sd.hooks import StepHooks

from .. import evaluation
from ..errors import OptionError
from .base import Algorithm, overlay, register_algorithm
from .context import TRAIN_STREAM, ClientJob
from .options import AlgorithmOptions

#: Seed stream of the body phase's extra epoch (apart from the round's own batches and fine-tuning's).
BODY_PHASE_STREAM = 2_000_003
#: Seed streams of the local update an evaluation re-runs (head phase, body phase).
EVAL_HEAD_STREAM, EVAL_BODY_STREAM = 2_000_011, 2_000_017


@dataclass
class FedRepOptions(AlgorithmOptions):
    #: epochs of the head phase; null = federation.local_epochs (tau), as FedBABU's code
    head_epochs: Optional[int] = None
    #: one SGD optimizer for both phases (the reference: the frozen part at lr 0, momentum carries over from the head
    #: phase into the body phase); false: a fresh optimizer per phase over the trained part only
    one_optimizer: bool = True
    #: at every evaluation every client re-runs its local update from the current body, is tested, and is rolled
    #: back (the reference); false: each client is evaluated with the head it kept from its last round
    retrain_at_evaluation: bool = True

    def validate(self) -> None:
        if self.head_epochs is not None and self.head_epochs < 1:
            raise OptionError("head_epochs", f"must be an integer >= 1 or null, got {self.head_epochs}")


class PhaseLearningRates(StepHooks):
    """Steps ``0 .. head_steps-1`` train the head (body group at lr 0), later steps the body (head group at lr 0),
    all in one optimizer: the body's momentum buffer fills during the head phase (gradients still reach it)."""

    def __init__(self, head_steps: int):
        self.head_steps = head_steps
        self.lrs: list[float] | None = None

    def before_step(self, step, optimizer):
        groups = optimizer.param_groups
        if self.lrs is None:
            self.lrs = [g["lr"] for g in groups]
        active = "head" if step < self.head_steps else "body"
        for g, lr in zip(groups, self.lrs):
            g["lr"] = lr if g["name"] == active else 0.0
        return False


@register_algorithm
class FedRep(Algorithm):
    """FedRep: each local update first trains the client's own head (body frozen) for ``head_epochs`` epochs, then
    the body (head frozen) for one epoch. The server averages the body; every client keeps its head across rounds.

    Reference protocol (defaults): one optimizer serves both phases (``one_optimizer``), and at every evaluation
    every client -- selected or not -- re-runs this local update from the current body at the current learning rate
    (the schedule's after the round), is tested with the result, and is rolled back (``retrain_at_evaluation``); the
    re-run draws its own batches, seeded by (seed, round, client). With ``head_epochs`` set, the head phase draws its
    own batches; the body epoch always draws its own.
    """

    name = "fedrep"
    description = "train own head (body frozen) then body (head frozen); aggregate body, heads stay local"
    Options = FedRepOptions
    loss = "ce"
    train_part = "full"  # both parts train, in two phases
    aggregate = "body"
    keeps_part = "head"

    def client_update(self, ctx, job, global_state, batches):
        return self._local_update(ctx, job, global_state, batches, TRAIN_STREAM, BODY_PHASE_STREAM)

    def _local_update(self, ctx, job, global_state, batches, head_stream: int, body_stream: int):
        """The two phases from ``global_state`` with the client's own head; ``batches``: the head phase's (tau
        epochs of ``head_stream``; ``head_epochs`` draws its own from that stream)."""
        c, r = job.client, job.round
        if self.options.head_epochs is not None:
            batches = ctx.batches(c, r, self.options.head_epochs, stream=head_stream)
        start = overlay(global_state, job.own_state)
        body_batches = ctx.batches(c, r, 1, stream=body_stream)
        n = ctx.num_train_samples(c)
        if self.options.one_optimizer:
            head_batches = list(batches)
            update = ctx.train([*head_batches, *body_batches], start=start, part="full", lr=job.lr,
                               loss=ctx.train_loss, hooks=PhaseLearningRates(len(head_batches)), return_head=True,
                               num_samples=n)
            return update, self.kept_state(update)
        head = ctx.train(batches, start=start, part="head", lr=job.lr, loss=ctx.train_loss)
        body = ctx.train(body_batches, start=None, part="body", lr=job.lr, loss=ctx.train_loss, return_head=True,
                         num_samples=n)
        body.metrics.update({f"head_phase_{k}": head.metrics[k] for k in ("loss", "acc_final") if k in head.metrics})
        body.num_steps += head.num_steps
        return body, self.kept_state(body)

    def evaluate(self, ctx, base_state, store, round_idx, lr):
        if not self.options.retrain_at_evaluation:
            return super().evaluate(ctx, base_state, store, round_idx, lr)
        results = []
        for c in range(ctx.num_clients):
            job = ClientJob(c, round_idx, lr, store.get(c))
            head_batches = ctx.batches(c, round_idx, ctx.local_epochs, stream=EVAL_HEAD_STREAM)
            self._local_update(ctx, job, base_state, head_batches, EVAL_HEAD_STREAM, EVAL_BODY_STREAM)
            results.append(ctx.predict(c))  # the network holds the re-trained model; nothing is stored (rollback)
        return evaluation.split_means(results)

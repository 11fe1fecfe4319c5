"""FedRep (Collins et al., 2021) as FedBABU's ``main_fedrep.py`` runs it (SPEC 9.1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import OptionError
from .base import Algorithm, overlay, register_algorithm
from .options import AlgorithmOptions

#: Seed stream of the body phase's extra epoch (apart from the round's own batches and fine-tuning's).
BODY_PHASE_STREAM = 2_000_003


@dataclass
class FedRepOptions(AlgorithmOptions):
    #: epochs of the head phase; null = federation.local_epochs (tau), as FedBABU's code
    head_epochs: Optional[int] = None

    def validate(self) -> None:
        if self.head_epochs is not None and self.head_epochs < 1:
            raise OptionError("head_epochs", f"must be an integer >= 1 or null, got {self.head_epochs}")


@register_algorithm
class FedRep(Algorithm):
    """FedRep: each local update first trains the client's own head with the body frozen for ``head_epochs`` epochs,
    then the body with the head frozen for one epoch. The server averages the body; every client keeps its head
    across rounds and is evaluated and personalised with it (clients never selected: the global, initial head).

    With ``head_epochs`` set, the head phase draws its own batches; the body epoch always draws its own, seeded by
    (seed, round, client).

    Not reproduced: FedBABU's evaluation re-runs the whole local procedure for every client from the current body
    before testing it (then rolls it back); here a client is evaluated with the head it kept from its last round.
    """

    name = "fedrep"
    description = "train own head (body frozen) then body (head frozen); aggregate body, heads stay local"
    Options = FedRepOptions
    loss = "ce"
    train_part = "full"  # both parts train, in two phases
    aggregate = "body"
    keeps_part = "head"

    def client_update(self, ctx, job, global_state, batches):
        c, r = job.client, job.round
        if self.options.head_epochs is not None:
            batches = ctx.batches(c, r, self.options.head_epochs)
        head = ctx.train(batches, start=overlay(global_state, job.own_state), part="head", lr=job.lr,
                         loss=ctx.train_loss)
        body = ctx.train(ctx.batches(c, r, 1, stream=BODY_PHASE_STREAM), start=None, part="body", lr=job.lr,
                         loss=ctx.train_loss, return_head=True, num_samples=ctx.num_train_samples(c))
        body.metrics.update({f"head_phase_{k}": head.metrics[k] for k in ("loss", "acc_final") if k in head.metrics})
        body.num_steps += head.num_steps
        return body, self.kept_state(body)

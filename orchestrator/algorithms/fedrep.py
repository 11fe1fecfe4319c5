"""FedRep (Collins et al., 2021) as FedBABU's ``main_fedrep.py`` runs it (SPEC 9.1)."""
from __future__ import annotations

from .base import Algorithm, register_algorithm

#: Seed tag of the body phase's extra epoch (apart from the round's own batches and fine-tuning's).
BODY_PHASE_TAG = 2_000_003


@register_algorithm
class FedRep(Algorithm):
    """FedRep: each local update first trains the client's own head with the body frozen for ``head_epochs`` epochs,
    then the body with the head frozen for one epoch. The server averages the body; every client keeps its head
    across rounds (``client_state[c]["head"]``) and is evaluated and personalised with it (clients never selected:
    the global, initial head).

    Options:
        head_epochs: epochs of the head phase; ``None`` (default) = ``federation.local_epochs`` (tau), as FedBABU's
            code. The head phase then runs on the round's own batches; the body epoch draws its own, seeded by
            (seed, round, client).

    Not reproduced: FedBABU's evaluation re-runs the whole local procedure for every client from the current body
    before testing it (then rolls it back); here a client is evaluated with the head it kept from its last round.
    """

    name = "fedrep"
    description = "train own head (body frozen) then body (head frozen); aggregate body, heads stay local"
    loss = "ce"
    train_part = "full"  # both parts train, in two phases
    aggregate = "body"
    personal_head = True
    option_defaults = {"head_epochs": None}

    @classmethod
    def validate_options(cls, options):
        super().validate_options(options)
        epochs = options.get("head_epochs")
        if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"fedrep option head_epochs must be an integer >= 1 or null, got {epochs!r}")

    def local_update(self, fed, client, batches, lr):
        module, head_lr = fed.module, fed.head_lr(lr)
        if self.options["head_epochs"] is not None:
            batches = fed.client_batches(client, fed.round, self.options["head_epochs"])
        head = module.local_update(batches, body_state=fed.global_body(), head_state=self.client_head(fed, client),
                                   train_part="head", lr=lr, head_lr=head_lr)
        body = module.local_update(fed.client_batches(client, fed.round, 1, tag=BODY_PHASE_TAG), train_part="body",
                                   lr=lr, head_lr=head_lr, return_head=True, num_samples=fed.num_train_samples(client))
        fed.client_state[client] = {"head": body.head_state}
        body.metrics.update({f"head_phase_{k}": head.metrics[k] for k in ("loss", "acc_final") if k in head.metrics})
        body.num_steps += head.num_steps
        return body

"""Ditto (Li et al., 2021) as FedBABU's ``main_ditto.py`` runs it (SPEC 9.1), with its personal models kept."""
from __future__ import annotations

from . import _local
from .base import Algorithm, register_algorithm


@register_algorithm
class Ditto(Algorithm):
    """Ditto: every selected client (1) trains the global model w locally (plain local SGD, the whole network); the
    server averages these local models into the next global model (FedAvg); and (2) trains its own personal model v
    with the same batches and the same SGD, its gradient plus the proximal pull ``lam * (v - w)`` toward the round's
    global model w, i.e. it minimises L(v) + lam/2 ||v - w||^2. Personal models persist across rounds
    (``client_state[c]["personal"]``, the whole state); a client is evaluated and personalised with its personal
    model (a client never selected: the global model).

    Options:
        lam: lambda, 0.75 as FedBABU's code ("follows FedRep").
        reset_personal: False (default). True starts every selected client's personal model from the round's global
            model instead of its own, i.e. personal models do not persist across rounds -- what FedBABU's code does by
            overwriting them all with the global at the end of every round (a defect); only to reproduce its numbers.

    Differences from FedBABU's code: it adds the pull after the momentum step, ``v -= lr0 * lam * (v_before - w)`` with
    the initial lr; here it is part of the gradient the optimizer sees (the same for plain SGD). Its global model is
    the average of the personal models; here of the local copies of the global model (Ditto's definition). Its
    training ignores the learning-rate decay (configs/paper/ditto reproduce that with lr_milestones: []).
    """

    name = "ditto"
    description = "FedAvg + per-client personal models pulled toward the global (lambda)"
    loss = "ce"
    train_part = "full"
    aggregate = "full"
    personal_state = "personal"
    option_defaults = {"lam": 0.75, "reset_personal": False}

    @classmethod
    def validate_options(cls, options):
        super().validate_options(options)
        lam = options.get("lam", 0.75)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ValueError(f"ditto option lam must be a number >= 0, got {lam!r}")
        if not isinstance(options.get("reset_personal", False), bool):
            raise ValueError(f"ditto option reset_personal must be true or false, got {options['reset_personal']!r}")

    def local_update(self, fed, client, batches, lr):
        batches = list(batches)  # used twice: the global copy and the personal model see the same batches
        update = fed.module.local_update(
            batches, body_state=fed.global_body(), head_state=fed.global_head(), train_part="full", lr=lr,
            head_lr=fed.head_lr(lr), return_head=True, num_samples=fed.num_train_samples(client))
        own = fed.client_state.get(client)
        start = fed.global_state if own is None or self.options["reset_personal"] else own["personal"]
        fed.module.load_state(start)
        glob, lam = fed.global_state, float(self.options["lam"])
        personal = _local.sgd_steps(fed, batches, lr, part="full", extra_grad=lambda name, p: lam * (p - glob[name]))
        fed.client_state[client] = {"personal": _local.full_state(fed)}
        update.metrics["personal_loss"] = personal["loss"]
        return update

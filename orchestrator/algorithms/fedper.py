"""FedPer (Arivazhagan et al., 2019) as FedBABU's ``main_fed.py --local_upt_part full --aggr_part body`` runs it."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm, register_algorithm
from .options import AlgorithmOptions


@dataclass
class FedPerOptions(AlgorithmOptions):
    #: false (the reference): the trained head is discarded every round, every client uses global body + initial
    #: head; true: each client keeps the head it trained (FedPer's own definition: personal heads)
    personal_heads: bool = False


@register_algorithm
class FedPer(Algorithm):
    """FedPer: train the whole network; the server averages the body.

    Reference protocol (default, ``personal_heads: false``): every selected client trains a copy of the global body
    with the global head, and only the body is written back -- the head it trained is thrown away, so the global head
    stays at its initialisation and every client is evaluated with global body + initial head (FedBABU's code).
    ``personal_heads: true``: each client keeps the head it trained across rounds and is evaluated and personalised
    with it (a never-selected client: the initial head).
    """

    name = "fedper"
    description = "train all, aggregate body; heads discarded (reference) or kept per client (personal_heads)"
    Options = FedPerOptions
    loss = "ce"
    train_part = "full"
    aggregate = "body"

    @property
    def keeps(self):
        return "head" if self.options.personal_heads else None

"""LG-FedAvg (Liang et al., 2020) as FedBABU's ``main_lg.py`` runs it (SPEC 9.1, 9.3)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..server import load_selected_state
from .base import Algorithm, register_algorithm
from .options import AlgorithmOptions


@dataclass
class LGFedAvgOptions(AlgorithmOptions):
    #: a finished FedAvg run directory to start from (the paper's protocol); null = this run's own initialisation
    init_from: Optional[str] = None


@register_algorithm
class LGFedAvg(Algorithm):
    """LG-FedAvg: local representations, global head. Every selected client trains its whole network (its own body
    with the global head); the server averages only the heads; each client keeps its body across rounds and is
    evaluated and personalised with it plus the global head. The global body never changes after the start: it is
    what a client that was never selected uses.

    ``init_from``: a finished FedAvg run directory (its ``checkpoint.pt``), the paper's protocol: LG-FedAvg starts from
    FedAvg's model -- its best-on-test state when this run selects ``federation.select: best`` (FedBABU loads
    FedAvg's ``best_model.pt``), else its final state. ``null`` (default): start from this run's own random
    initialisation (then the global body stays random: a weak baseline, for tests and ablations only).

    Paper settings (configs/paper/lg_fedavg): lr 0.001 without decay, R = 80/20/8 for tau = 1/4/10, from the matching
    FedAvg cell. Not reproduced: ``main_lg.py`` keeps, per client, the best-on-test local model of all rounds.
    """

    name = "lg_fedavg"
    description = "train all, aggregate heads, bodies stay local (starts from a FedAvg run)"
    Options = LGFedAvgOptions
    loss = "ce"
    train_part = "full"
    aggregate = "head"
    keeps_part = "body"

    def setup(self, server):
        if self.options.init_from is None:
            return
        state, which = load_selected_state(Path(self.options.init_from), server.select, server.global_state,
                                           "config key algorithm.lg_fedavg.init_from", server.model_description)
        for key, value in state.items():
            server.global_state[key].copy_(value)
        server.log(f"lg_fedavg: starting from the {which} model of {self.options.init_from}")

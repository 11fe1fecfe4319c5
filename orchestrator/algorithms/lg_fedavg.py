"""LG-FedAvg (Liang et al., 2020) as FedBABU's ``main_lg.py`` runs it (SPEC 9.1, 9.3)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import evaluation
from ..server import clone_state, load_selected_state
from .base import Algorithm, overlay, register_algorithm
from .options import AlgorithmOptions


@dataclass
class LGFedAvgOptions(AlgorithmOptions):
    path_fields = ("init_from",)
    #: a finished FedAvg run directory to start from (the paper's protocol); null = this run's own initialisation
    init_from: Optional[str] = None
    #: the reference's model selection: each client's best round on its test split (round -1, the start, included),
    #: the heads of those per-client best models re-averaged, the mean over clients reported; false: every client's
    #: current model (own body + global head) at each evaluation
    per_client_best: bool = True


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

    ``per_client_best`` (default, ``main_lg.py``): at each evaluation every client's current model is tested; a
    client's best model so far (test accuracy >=, the start counting as round -1) is replaced by it when it is at
    least as good; the heads of the per-client best models are averaged into one head, and what is scored is every
    client's best body with that averaged head (the server then keeps the best of these means: the reported number).
    Selection on the test set, per client, as the reference; it needs an evaluation every round to match it.

    Paper settings (configs/paper/lg_fedavg): lr 0.001 without decay, R = 80/20/8 for tau = 1/4/10, from the matching
    FedAvg cell.
    """

    name = "lg_fedavg"
    description = "train all, aggregate heads, bodies stay local (starts from a FedAvg run)"
    Options = LGFedAvgOptions
    loss = "ce"
    train_part = "full"
    aggregate = "head"
    keeps_part = "body"

    def __init__(self, options=None):
        super().__init__(options)
        #: (per_client_best) the model the run started from (round -1), and per client its best accuracy and model
        self.initial: dict[str, torch.Tensor] | None = None
        self.best_acc: np.ndarray | None = None
        self.best_models: dict[int, dict[str, torch.Tensor]] = {}

    def setup(self, server):
        self._load_init(server)
        self.initial = clone_state(server.global_state)

    def _load_init(self, server):
        if self.options.init_from is None:
            return
        state, which = load_selected_state(Path(self.options.init_from), server.select, server.global_state,
                                           "config key algorithm.lg_fedavg.init_from", server.model_description)
        for key, value in state.items():
            server.global_state[key].copy_(value)
        server.log(f"lg_fedavg: starting from the {which} model of {self.options.init_from}")

    # -- the reference's per-client model selection ---------------------------------------------------------------
    def evaluate(self, ctx, base_state, store, round_idx, lr):
        if not self.options.per_client_best:
            return super().evaluate(ctx, base_state, store, round_idx, lr)
        heads = ctx.part_keys("head")
        if self.best_acc is None:  # round -1: every client with the starting model
            self.best_acc = evaluation.client_models(ctx, lambda c: self.initial)[0][0]
            self.best_models = {c: self.initial for c in range(ctx.num_clients)}
        current = {c: overlay(base_state, store.get(c)) for c in range(ctx.num_clients)}
        acc_now = evaluation.client_models(ctx, lambda c: current[c])[0][0]
        for c in range(ctx.num_clients):
            if acc_now[c] >= self.best_acc[c]:
                self.best_acc[c] = acc_now[c]
                self.best_models[c] = clone_state(current[c])
        n = ctx.num_clients
        head = {k: sum(self.best_models[c][k].double() for c in range(n)).div(n).to(base_state[k].dtype)
                for k in heads}
        return evaluation.client_models(ctx, lambda c: {**self.best_models[c], **head})

    def state_dict(self):
        if self.best_acc is None:
            return {}
        return {"best_acc": self.best_acc.tolist(), "best_models": self.best_models}

    def load_state_dict(self, state, device):
        if "best_acc" in state:
            self.best_acc = np.array(state["best_acc"], dtype=float)
            self.best_models = {int(c): {k: v.to(device) for k, v in m.items()}
                                for c, m in state["best_models"].items()}

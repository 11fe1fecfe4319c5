"""LG-FedAvg (Liang et al., 2020) as FedBABU's ``main_lg.py`` runs it (SPEC 9.1, 9.3)."""
from __future__ import annotations

from pathlib import Path

import torch

from .base import Algorithm, register_algorithm


@register_algorithm
class LGFedAvg(Algorithm):
    """LG-FedAvg: local representations, global head. Every selected client trains its whole network (its own body
    with the global head); the server averages only the heads; each client keeps its body across rounds
    (``client_state[c]["body"]``) and is evaluated and personalised with it plus the global head. The global body never
    changes after the start: it is what a client that was never selected uses.

    Options:
        init_from: a finished FedAvg run directory (its ``checkpoint.pt``), the paper's protocol: LG-FedAvg starts from
            FedAvg's model -- its best-on-test state when this run selects ``federation.select: best`` (FedBABU loads
            FedAvg's ``best_model.pt``), else its final state. ``None`` (default): start from this run's own random
            initialisation (then the global body stays random: a weak baseline, for tests and ablations only).

    Paper settings (configs/paper/lg_fedavg): lr 0.001 without decay, R = 80/20/8 for tau = 1/4/10, from the matching
    FedAvg cell. Not reproduced: ``main_lg.py`` keeps, per client, the best-on-test local model of all rounds.
    """

    name = "lg_fedavg"
    description = "train all, aggregate heads, bodies stay local (starts from a FedAvg run)"
    loss = "ce"
    train_part = "full"
    aggregate = "head"
    personal_state = "body"
    option_defaults = {"init_from": None}

    @classmethod
    def validate_options(cls, options):
        super().validate_options(options)
        init = options.get("init_from")
        if init is not None and (not isinstance(init, str) or not init):
            raise ValueError(f"lg_fedavg option init_from must be a run directory path or null, got {init!r}")

    def setup(self, fed):
        if self.options["init_from"] is not None:
            state = load_init_state(Path(self.options["init_from"]), fed)
            for key, value in state.items():
                fed.global_state[key].copy_(value)

    def shared_keys(self, fed):
        return fed.module.net.head_state_keys()

    def local_update(self, fed, client, batches, lr):
        own = fed.client_state.get(client)
        update = fed.module.local_update(
            batches, body_state=own["body"] if own else fed.global_body(), head_state=fed.global_head(),
            train_part="full", lr=lr, head_lr=fed.head_lr(lr), return_head=True,
            num_samples=fed.num_train_samples(client))
        fed.client_state[client] = {"body": update.body_state}
        return update

    def shared_state(self, fed, update):
        return dict(update.head_state)



def load_init_state(run_dir: Path, fed) -> dict[str, torch.Tensor]:
    """The model state to start from in a finished run directory; ConfigError (one line) if missing or mismatched."""
    from ..checkpoint import CHECKPOINT, CheckpointError, load_checkpoint
    from ..config import ConfigError

    key = "config key algorithm.options.init_from"
    if not (run_dir / CHECKPOINT).exists():
        raise ConfigError(f"{key}: no {CHECKPOINT} in {run_dir}; run the FedAvg cell first "
                          "(its run directory, e.g. runs/paper-fedavg-s100-f0.1-tau1), or set init_from: null")
    try:
        saved = load_checkpoint(run_dir, {})
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}") from None
    best = saved.get("best") or {}
    use_best = fed.cfg.federation.select == "best" and best.get("state") is not None
    state = best["state"] if use_best else saved["global_state"]
    own = fed.global_state
    if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"{key}: the model in {run_dir} is not this run's {fed.cfg.model.name} with "
                          f"{fed.module.net.num_classes} classes and model.options {fed.cfg.model.options} "
                          "(different state keys or shapes); use the FedAvg run of the same model")
    fed.log(f"lg_fedavg: starting from the {'best' if use_best else 'final'} model of {run_dir}")
    return {k: v.to(own[k].device, own[k].dtype) for k, v in state.items()}

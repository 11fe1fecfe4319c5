"""MHMD = FedBABU + the multi-head mutual-distillation loss, and its ablations (SPEC 3.7)."""
from .fedbabu import FedBABU
from .base import register_algorithm


@register_algorithm
class MHMD(FedBABU):
    """FedBABU's body-only training with the MHMD loss; BatchNorm tracks running statistics (as MHMD's models)."""

    name = "mhmd"
    description = "FedBABU + multi-head mutual distillation (loss mode 1005)"
    loss = "mhmd"
    model_defaults = {"track_running_stats": True}


def _ablation(preset: str, doc: str):
    cls = type(f"MHMD_{preset}", (MHMD,), {"name": f"mhmd_{preset}", "description": doc, "loss": preset,
                                           "__doc__": doc})
    return register_algorithm(cls)


MHMDNoScaler = _ablation("no_scaler", "MHMD without the learned temperature scaler (mode 1001)")
MHMDUngated = _ablation("ungated", "one-way KD final->aux on all samples (mode 1002)")
MHMDCoarseGated = _ablation("coarse_gated", "one-way KD on all samples if any is right (mode 1003)")
MHMDOneWay = _ablation("one_way", "gated self-distillation only, no mutual term (mode 1004)")
MHMDCEOnly = _ablation("ce", "CE on the final head only, MHMD's model and BN (mode 1)")
MHMDCEAux = [_ablation(f"ce_aux{i}", f"CE on auxiliary head {i} only, no final-head loss, no scaler (mode {2 + i})")
             for i in range(3)]

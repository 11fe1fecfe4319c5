"""The MHMD local loss (SPEC section 3; the reference's loss mode 1005) and its ablations (SPEC 3.7).

    L = CE(final) + aux_weight * sum_l CE(aux_l)
        + kd_weight * sum_l [ T^2 KL(p || q_l) on rows where the final head is correct        (self-distillation)
                            + T^2 KL(q_l || p) on rows where auxiliary head l is correct ]    (mutual distillation)

with p = softmax(final / T), q_l = softmax(a_l / T), a_l the auxiliary logits divided by their learned temperature
sigmoid(s). Defaults are the reference's: element-mean KL (divide by rows x K), neither side detached.

The gating is computed without host synchronisation: masked rows are summed and divided by max(count, 1), which is
exactly the reference's "skip the term when its mask is empty" (an empty mask contributes 0).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from .models.base import MultiHeadOutput

Gating = Literal["correct", "batch", "none"]
Direction = Literal["mutual", "self"]
Reduction = Literal["mean", "batchmean"]


@dataclass(frozen=True)
class LossConfig:
    """Every knob of the multi-head loss.

    aux_weight: weight of the summed auxiliary cross-entropies (0 disables them).
    kd_weight: weight of the summed distillation terms (0 disables distillation).
    temperature: global KD temperature T (the KD terms are multiplied by T^2).
    use_scaler: divide auxiliary logits by their learned per-sample temperature sigmoid(s) (off = ablation 1001); for
        a model with a final-head scaler (the historic ResNet-50) the final logits too (``final_scaled``).
    direction: ``mutual`` = self-distillation final->aux plus mutual aux->final; ``self`` = final->aux only.
    gating: ``correct`` = each KL term on the rows its teacher gets right (the reference);
            ``batch`` = on all rows, if the teacher gets any row right (ablation 1003); ``none`` = all rows (1002).
    reduction: ``mean`` = the reference's element mean (divide by rows x K); ``batchmean`` = divide by rows.
    detach_teacher: stop gradients into the teacher side of each KL term (the reference does not).
    final_weight: weight of the final head's cross-entropy (0: the final head gets no loss, modes 2/3/4).
    aux_only: cross-entropy on this one auxiliary head only (the reference's modes 2/3/4: aux head 0/1/2); None: on
        every auxiliary head.
    """

    aux_weight: float = 10.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    use_scaler: bool = True
    direction: Direction = "mutual"
    gating: Gating = "correct"
    reduction: Reduction = "mean"
    detach_teacher: bool = False
    final_weight: float = 1.0
    aux_only: int | None = None

    def __post_init__(self):
        if self.aux_only is not None and self.aux_only < 0:
            raise ValueError(f"loss.aux_only must be an auxiliary head index >= 0 or None, got {self.aux_only}")
        for name in ("aux_weight", "kd_weight", "final_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"loss.temperature must be > 0, got {self.temperature}")
        choices = {"direction": ("mutual", "self"), "gating": ("correct", "batch", "none"),
                   "reduction": ("mean", "batchmean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"loss.{name} must be one of {allowed}, got {getattr(self, name)!r}")


#: Named variants. ``mhmd`` is the reference's mode 1005; the others are the ablations of SPEC 3.7.
PRESETS: dict[str, dict] = {
    "mhmd": {},                                                   # 1005: gated SD + gated mutual distillation
    "ce": {"aux_weight": 0.0, "kd_weight": 0.0},                  # 1: CE on the final head only (= FedBABU)
    "no_scaler": {"use_scaler": False},                           # 1001: MHMD without the temperature scaler
    "ungated": {"direction": "self", "gating": "none"},           # 1002: one-way KD on all rows
    "coarse_gated": {"direction": "self", "gating": "batch"},     # 1003: one-way KD on all rows if any is correct
    "one_way": {"direction": "self"},                             # 1004: gated self-distillation only
    # 2 / 3 / 4: cross-entropy on auxiliary head 0 / 1 / 2 only (aux weight), no final-head loss, no scaler
    **{f"ce_aux{i}": {"final_weight": 0.0, "kd_weight": 0.0, "aux_only": i, "use_scaler": False} for i in range(3)},
}


def loss_config(preset: str = "mhmd", **overrides) -> LossConfig:
    """A :class:`LossConfig` from a named preset, with field overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown loss preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(fields) - set(asdict(LossConfig()))
    if unknown:
        raise ValueError(f"unknown loss option(s) {sorted(unknown)}; valid: {sorted(asdict(LossConfig()))}")
    return replace(LossConfig(), **fields)


class LossOutput(NamedTuple):
    """The total loss and its weighted parts (``total == ce_final + ce_aux + kd_self + kd_mutual``)."""

    total: Tensor
    ce_final: Tensor
    ce_aux: Tensor
    kd_self: Tensor
    kd_mutual: Tensor


def gated_kl(log_student: Tensor, log_teacher: Tensor, mask: Tensor | None, reduction: Reduction) -> Tensor:
    """KL(teacher || student) summed over the rows in ``mask``, divided by (rows x K) or rows.

    Equals ``KLDivLoss(reduction, log_target=True)(log_student[mask], log_teacher[mask])`` when the mask is
    non-empty and 0 when it is empty, without a data-dependent host synchronisation.
    """
    per_row = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    if mask is None:
        rows = per_row.new_tensor(float(per_row.shape[0]))
        total = per_row.sum()
    else:
        maskf = mask.to(per_row.dtype)
        rows = maskf.sum().clamp_min(1.0)
        total = (per_row * maskf).sum()
    denom = rows * log_student.shape[1] if reduction == "mean" else rows
    return total / denom


class MultiHeadLoss(nn.Module):
    """Cross-entropy on every head plus gated self-/mutual distillation. Call with (model output, labels)."""

    def __init__(self, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()

    def _gate(self, logits: Tensor, target: Tensor) -> Tensor | None:
        gating = self.config.gating
        if gating == "none":
            return None
        correct = logits.detach().argmax(dim=1) == target
        if gating == "correct":
            return correct
        return correct.any().expand_as(correct)  # "batch": all rows if any row is right, else none

    def forward(self, output: MultiHeadOutput, target: Tensor) -> LossOutput:
        cfg = self.config
        final = output.final_scaled[0] if cfg.use_scaler and output.final_scaled else output.final
        zero = final.new_zeros(())
        ce_final = F.cross_entropy(final, target)
        if cfg.final_weight != 1.0:
            ce_final = cfg.final_weight * ce_final
        aux_logits = output.aux if cfg.use_scaler else output.aux_raw
        ce_aux = zero
        if cfg.aux_only is not None and cfg.aux_only >= len(aux_logits):
            raise ValueError(f"loss.aux_only = {cfg.aux_only}, but the network has {len(aux_logits)} auxiliary heads")
        trained = aux_logits if cfg.aux_only is None else [aux_logits[cfg.aux_only]]
        if cfg.aux_weight > 0 and trained:
            ce_aux = cfg.aux_weight * sum((F.cross_entropy(a, target) for a in trained), zero)
        kd_self = kd_mutual = zero
        if cfg.kd_weight > 0 and aux_logits:
            T = cfg.temperature
            log_p = F.log_softmax(final / T, dim=1)
            mask_f = self._gate(final, target)
            sd, md = [], []
            for a in aux_logits:
                log_q = F.log_softmax(a / T, dim=1)
                teacher_p = log_p.detach() if cfg.detach_teacher else log_p
                sd.append(gated_kl(log_q, teacher_p, mask_f, cfg.reduction))
                if cfg.direction == "mutual":
                    teacher_q = log_q.detach() if cfg.detach_teacher else log_q
                    md.append(gated_kl(log_p, teacher_q, self._gate(a, target), cfg.reduction))
            kd_self = cfg.kd_weight * T * T * sum(sd)
            if md:
                kd_mutual = cfg.kd_weight * T * T * sum(md)
        total = ce_final + ce_aux + kd_self + kd_mutual
        return LossOutput(total, ce_final, ce_aux, kd_self, kd_mutual)

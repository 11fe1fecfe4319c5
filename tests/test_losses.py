"""Tests of the MHMD local loss (SPEC section 3) on hand-made model outputs.

Expected values are computed independently of fl_sd: in float64 numpy (explicit sums of p * (log p - log q)) or,
for the reference equivalence, with torch.nn.KLDivLoss exactly as the reference code calls it.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fl_sd.losses import PRESETS, LossConfig, LossOutput, MultiHeadLoss, loss_config
from fl_sd.models import MultiHeadOutput


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

# --- a hand-made batch: B = 4 rows, K = 3 classes, three auxiliary heads -------------------------------------
#
# labels              0      1      2      0
# final argmax        0      1      0      2     -> final correct on rows {0, 1}
# aux0 argmax         0      0      2      0     -> correct on rows {0, 2, 3}
# aux1 argmax         1      2      0      1     -> correct on no row
# aux2 argmax         0      1      2      0     -> correct on every row
LABELS = [0, 1, 2, 0]
FINAL = [[2.0, 0.5, -1.0],
         [0.1, 1.5, 0.3],
         [1.2, -0.4, 0.9],
         [-0.5, 0.2, 0.7]]
AUX_RAW = [
    [[1.0, 0.2, -0.3], [0.9, 0.4, 0.1], [-0.2, 0.3, 0.8], [0.6, -0.1, 0.5]],
    [[0.1, 0.9, -0.2], [0.3, -0.5, 1.1], [0.7, 0.2, -0.6], [-0.3, 0.4, 0.2]],
    [[1.4, -0.2, 0.3], [-0.1, 0.8, 0.2], [0.0, -0.3, 0.6], [0.9, 0.1, -0.4]],
]
TEMPS = [[0.5, 0.8, 0.25, 0.9], [0.3, 0.6, 0.7, 0.45], [0.95, 0.2, 0.55, 0.65]]
MASK_F = [True, True, False, False]
MASK_AUX = [[True, False, True, True], [False] * 4, [True] * 4]
K = 3


def make_output(final=FINAL, aux_raw=AUX_RAW, temps=TEMPS, requires_grad=False, scaled=True):
    """A MultiHeadOutput built by hand (aux = aux_raw / temperature, as a model in training mode serves it)."""
    f = torch.tensor(final, dtype=torch.float32, requires_grad=requires_grad)
    raw = tuple(torch.tensor(u, dtype=torch.float32, requires_grad=requires_grad) for u in aux_raw)
    t = tuple(torch.tensor(x, dtype=torch.float32) for x in temps)
    aux = tuple(u / tt[:, None] for u, tt in zip(raw, t)) if scaled else raw
    return MultiHeadOutput(f, aux, raw, t)


def labels(values=LABELS):
    return torch.tensor(values)


# --- independent float64 reference --------------------------------------------------------------------------

def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def np_ce(logits, y):
    ls = np_log_softmax(logits)
    return float(np.mean([-ls[i, yi] for i, yi in enumerate(y)]))


def np_kl_sum(log_teacher, log_student, rows):
    """sum over the given rows and all classes of p_t * (log p_t - log p_s)."""
    total = 0.0
    for i in rows:
        for c in range(log_teacher.shape[1]):
            pt = np.exp(log_teacher[i, c])
            total += pt * (log_teacher[i, c] - log_student[i, c])
    return total


def np_scaled(aux_raw=AUX_RAW, temps=TEMPS):
    return [np.asarray(u, dtype=np.float64) / np.asarray(t, dtype=np.float64)[:, None] for u, t in zip(aux_raw, temps)]


def np_kd(final, aux, mask_f, masks_aux, T=1.0, reduction="mean", direction="mutual"):
    """(self, mutual) distillation sums as SPEC 3.3/3.4 write them; a mask is a list of bools per row."""
    k = np.asarray(final).shape[1]
    log_p = np_log_softmax(np.asarray(final, dtype=np.float64) / T)
    sd = md = 0.0
    for l, a in enumerate(aux):
        log_q = np_log_softmax(np.asarray(a, dtype=np.float64) / T)
        rows = [i for i, m in enumerate(mask_f) if m]
        if rows:
            sd += T * T * np_kl_sum(log_p, log_q, rows) / (len(rows) * (k if reduction == "mean" else 1))
        rows = [i for i, m in enumerate(masks_aux[l]) if m]
        if rows and direction == "mutual":
            md += T * T * np_kl_sum(log_q, log_p, rows) / (len(rows) * (k if reduction == "mean" else 1))
    return sd, md


def assert_parts_sum(out: LossOutput):
    torch.testing.assert_close(out.total, out.ce_final + out.ce_aux + out.kd_self + out.kd_mutual)


def close(value, expected, tol=1e-6):
    value = float(value.detach()) if torch.is_tensor(value) else float(value)
    assert abs(value - expected) <= tol * max(1.0, abs(expected)), (value, expected)


# --- sanity of the hand-made batch itself -------------------------------------------------------------------

def test_hand_made_masks_are_what_the_comments_say():
    y = np.array(LABELS)
    assert list(np.argmax(FINAL, axis=1) == y) == MASK_F
    for l in range(3):
        assert list(np.argmax(AUX_RAW[l], axis=1) == y) == MASK_AUX[l]


# --- cross-entropy parts ------------------------------------------------------------------------------------

@pytest.mark.parametrize("aux_weight", (10.0, 0.5, 0.01))
def test_cross_entropy_parts(aux_weight):
    out = MultiHeadLoss(loss_config(aux_weight=aux_weight))(make_output(), labels())
    close(out.ce_final, np_ce(FINAL, LABELS))
    close(out.ce_aux, aux_weight * sum(np_ce(a, LABELS) for a in np_scaled()))
    assert_parts_sum(out)


def test_cross_entropy_uses_scaled_aux_logits():
    cfg = loss_config(aux_weight=1.0)
    out = MultiHeadLoss(cfg)(make_output(), labels())
    raw_ce = sum(np_ce(u, LABELS) for u in AUX_RAW)
    assert abs(float(out.ce_aux) - raw_ce) > 1e-3
    out_raw = MultiHeadLoss(dataclasses.replace(cfg, use_scaler=False))(make_output(), labels())
    close(out_raw.ce_aux, raw_ce)


# --- distillation with gating ----------------------------------------------------------------------------------

def test_self_and_mutual_distillation_hand_computed():
    out = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    aux = np_scaled()
    log_p = np_log_softmax(FINAL)
    # written out per head: self-KD over rows {0, 1}; mutual over {0, 2, 3}, none, all four rows
    expected_sd = sum(np_kl_sum(log_p, np_log_softmax(a), [0, 1]) / (2 * K) for a in aux)
    lq = [np_log_softmax(a) for a in aux]
    expected_md = np_kl_sum(lq[0], log_p, [0, 2, 3]) / (3 * K) + 0.0 + np_kl_sum(lq[2], log_p, [0, 1, 2, 3]) / (4 * K)
    close(out.kd_self, expected_sd)
    close(out.kd_mutual, expected_md)
    assert (expected_sd, expected_md) == pytest.approx(np_kd(FINAL, aux, MASK_F, MASK_AUX), rel=1e-12)
    assert float(out.kd_self) > 0 and float(out.kd_mutual) > 0
    assert_parts_sum(out)
    close(out.total, np_ce(FINAL, LABELS) + 10 * sum(np_ce(a, LABELS) for a in aux) + expected_sd + expected_md)


def _single_head(l):
    return make_output(aux_raw=[AUX_RAW[l]], temps=[TEMPS[l]])


@pytest.mark.parametrize("head", (0, 1, 2))
def test_mutual_term_per_head(head):
    """Partially true (head 0), empty (head 1: exactly 0) and all-true (head 2) masks, one head at a time."""
    out = MultiHeadLoss(loss_config("mhmd"))(_single_head(head), labels())
    a = np_scaled([AUX_RAW[head]], [TEMPS[head]])
    sd, md = np_kd(FINAL, a, MASK_F, [MASK_AUX[head]])
    close(out.kd_self, sd)
    close(out.kd_mutual, md)
    if head == 1:
        assert float(out.kd_mutual) == 0.0
    else:
        assert float(out.kd_mutual) > 0


def test_all_true_mask_equals_ungated():
    y = np.argmax(FINAL, axis=1).tolist()  # the final head is right on every row
    out = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels(y))
    out_ungated = MultiHeadLoss(loss_config("mhmd", gating="none"))(make_output(), labels(y))
    aux = np_scaled()
    log_p = np_log_softmax(FINAL)
    expected = sum(np_kl_sum(log_p, np_log_softmax(a), range(4)) / (4 * K) for a in aux)
    close(out.kd_self, expected)
    close(out_ungated.kd_self, expected)


def test_empty_final_mask_gives_exactly_zero_self_distillation():
    y = [(int(np.argmax(r)) + 1) % K for r in FINAL]  # the final head is wrong on every row
    out = MultiHeadLoss(loss_config("mhmd"))(make_output(requires_grad=True), labels(y))
    assert out.kd_self.item() == 0.0
    masks = [list(np.argmax(u, axis=1) == np.array(y)) for u in AUX_RAW]
    assert any(any(m) for m in masks)
    _, md = np_kd(FINAL, np_scaled(), [False] * 4, masks)
    close(out.kd_mutual, md)
    out.total.backward()  # the empty-mask terms leave no NaN behind
    assert torch.isfinite(out.total)


def test_all_heads_wrong_gives_exactly_zero_distillation():
    # a fourth class that every head scores lowest on every row, and every label is that class
    final4 = [row + [-5.0] for row in FINAL]
    raw4 = [[row + [-5.0] for row in u] for u in AUX_RAW]
    wrong_everywhere = [3, 3, 3, 3]
    o = make_output(final4, raw4, requires_grad=True)
    out = MultiHeadLoss(loss_config("mhmd"))(o, labels(wrong_everywhere))
    assert out.kd_self.item() == 0.0 and out.kd_mutual.item() == 0.0
    close(out.total, np_ce(final4, wrong_everywhere)
          + 10 * sum(np_ce(a, wrong_everywhere) for a in np_scaled(raw4)))
    for g in _grads(out.kd_self + out.kd_mutual, [o.final, *o.aux_raw]):
        assert torch.equal(g, torch.zeros_like(g))  # zero gradient, and no NaN from an empty mask


def test_unselected_rows_get_no_distillation_gradient():
    o = make_output(requires_grad=True)
    out = MultiHeadLoss(loss_config("one_way"))(o, labels())
    grads = torch.autograd.grad(out.kd_self, [o.final, *o.aux_raw])
    for g in grads:
        assert g[~torch.tensor(MASK_F)].abs().max() == 0  # rows 2, 3: final head wrong
        assert g[torch.tensor(MASK_F)].abs().max() > 0


# --- reduction and temperature --------------------------------------------------------------------------------

def test_batchmean_divides_by_rows_only():
    mean = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    batchmean = MultiHeadLoss(loss_config("mhmd", reduction="batchmean"))(make_output(), labels())
    sd, md = np_kd(FINAL, np_scaled(), MASK_F, MASK_AUX, reduction="batchmean")
    close(batchmean.kd_self, sd)
    close(batchmean.kd_mutual, md)
    close(batchmean.kd_self, K * float(mean.kd_self))
    close(batchmean.kd_mutual, K * float(mean.kd_mutual))
    torch.testing.assert_close(batchmean.ce_final, mean.ce_final)
    torch.testing.assert_close(batchmean.ce_aux, mean.ce_aux)


@pytest.mark.parametrize("T", (2.0, 0.5, 4.0))
def test_global_temperature(T):
    out = MultiHeadLoss(loss_config("mhmd", temperature=T))(make_output(), labels())
    aux = np_scaled()
    log_p = np_log_softmax(np.asarray(FINAL) / T)
    lq = [np_log_softmax(a / T) for a in aux]
    expected_sd = T * T * sum(np_kl_sum(log_p, q, [0, 1]) / (2 * K) for q in lq)
    expected_md = T * T * (np_kl_sum(lq[0], log_p, [0, 2, 3]) / (3 * K) + np_kl_sum(lq[2], log_p, range(4)) / (4 * K))
    close(out.kd_self, expected_sd)
    close(out.kd_mutual, expected_md)
    # the masks and the cross-entropies do not depend on T
    ref = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    torch.testing.assert_close(out.ce_final, ref.ce_final)
    torch.testing.assert_close(out.ce_aux, ref.ce_aux)
    assert_parts_sum(out)


@pytest.mark.parametrize("kd_weight", (0.1, 2.5))
def test_kd_weight_scales_both_distillation_parts(kd_weight):
    base = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    out = MultiHeadLoss(loss_config("mhmd", kd_weight=kd_weight))(make_output(), labels())
    close(out.kd_self, kd_weight * float(base.kd_self))
    close(out.kd_mutual, kd_weight * float(base.kd_mutual))
    torch.testing.assert_close(out.ce_aux, base.ce_aux)


# --- equivalence with the reference formula ----------------------------------------------------------------------

def reference_mhmd_loss(final, aux, y, T=1.0, aux_weight=10.0, kd_weight=1.0):
    """The reference's mode-1005 loss as SPEC 3 describes it: KLDivLoss(log_target=True), default 'mean'."""
    ce = nn.CrossEntropyLoss()
    kl = nn.KLDivLoss(log_target=True)  # reduction='mean': divides by #elements = rows * K
    log_p = F.log_softmax(final / T, dim=1)
    log_q = [F.log_softmax(a / T, dim=1) for a in aux]
    mask_f = final.detach().max(1)[1] == y
    sd = md = final.new_zeros(())
    if mask_f.any():
        for lq in log_q:
            sd = sd + T * T * kl(lq[mask_f], log_p[mask_f])
    for a, lq in zip(aux, log_q):
        mask_l = a.detach().max(1)[1] == y
        if mask_l.any():
            md = md + T * T * kl(log_p[mask_l], lq[mask_l])
    ce_final = ce(final, y)
    ce_aux = aux_weight * sum(ce(a, y) for a in aux)
    return ce_final + ce_aux + kd_weight * (sd + md), ce_final, ce_aux, kd_weight * sd, kd_weight * md


def random_case(seed, batch=16, k=10, force_correct=True):
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(batch, k, generator=g) * 2
    raw = [torch.randn(batch, k, generator=g) * 2 for _ in range(3)]
    s = [torch.randn(batch, generator=g) for _ in range(3)]
    y = torch.randint(0, k, (batch,), generator=g)
    if force_correct:  # make every mask non-empty: row 0 right for the final head, row l+1 for aux head l
        y[0] = final[0].argmax()
        for l in range(3):
            y[l + 1] = raw[l][l + 1].argmax()
    return final, raw, s, y


def build(final, raw, s, scale=True):
    f = final.clone().requires_grad_(True)
    u = [r.clone().requires_grad_(True) for r in raw]
    ss = [x.clone().requires_grad_(True) for x in s]
    t = [torch.sigmoid(x) for x in ss]
    aux = tuple(ui / ti[:, None] for ui, ti in zip(u, t)) if scale else tuple(u)
    return MultiHeadOutput(f, aux, tuple(u), tuple(t)), [f, *u, *ss]


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("T", (1.0, 2.0))
@pytest.mark.parametrize("seed,force", [(0, True), (1, True), (2, True), (3, False), (4, False)])
def test_matches_reference_kldivloss_values_and_gradients(seed, force, T):
    final, raw, s, y = random_case(seed, force_correct=force)
    ours_out, ours_leaves = build(final, raw, s)
    ref_out, ref_leaves = build(final, raw, s)
    ours = MultiHeadLoss(loss_config("mhmd", temperature=T))(ours_out, y)
    ref = reference_mhmd_loss(ref_out.final, ref_out.aux, y, T=T)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if force:
        assert ours.kd_self.item() > 0 and ours.kd_mutual.item() > 0
    g_ours = torch.autograd.grad(ours.total, ours_leaves)
    g_ref = torch.autograd.grad(ref[0], ref_leaves)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_reference_gradient_of_distillation_alone():
    """The KD parts on their own (gradients are small next to 10 x CE, so compare them separately)."""
    final, raw, s, y = random_case(7)
    ours_out, ours_leaves = build(final, raw, s)
    ref_out, ref_leaves = build(final, raw, s)
    ours = MultiHeadLoss(loss_config("mhmd"))(ours_out, y)
    ref = reference_mhmd_loss(ref_out.final, ref_out.aux, y)
    g_ours = torch.autograd.grad(ours.kd_self + ours.kd_mutual, ours_leaves)
    g_ref = torch.autograd.grad(ref[3] + ref[4], ref_leaves)
    for a, b in zip(g_ours, g_ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


# --- presets ------------------------------------------------------------------------------------------------

def test_preset_table():
    assert set(PRESETS) == {"mhmd", "ce", "no_scaler", "ungated", "coarse_gated", "one_way", "ce_aux0", "ce_aux1",
                            "ce_aux2"}
    mhmd = loss_config("mhmd")
    assert mhmd == LossConfig()
    assert (mhmd.aux_weight, mhmd.kd_weight, mhmd.temperature) == (10.0, 1.0, 1.0)
    assert (mhmd.use_scaler, mhmd.direction, mhmd.gating, mhmd.reduction, mhmd.detach_teacher) == \
        (True, "mutual", "correct", "mean", False)
    assert MultiHeadLoss().config == LossConfig()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_parts_sum_to_total(preset):
    for y in (LABELS, [2, 0, 1, 1], np.argmax(FINAL, axis=1).tolist()):
        out = MultiHeadLoss(loss_config(preset))(make_output(), labels(y))
        assert_parts_sum(out)
        assert all(torch.isfinite(p) and p.dim() == 0 for p in out)
        assert all(float(p) >= 0 for p in out)


def test_preset_ce():
    o = make_output(requires_grad=True)
    out = MultiHeadLoss(loss_config("ce"))(o, labels())
    assert float(out.ce_aux) == float(out.kd_self) == float(out.kd_mutual) == 0.0
    close(out.ce_final, np_ce(FINAL, LABELS))
    assert torch.equal(out.total, F.cross_entropy(o.final, labels()))
    grads = torch.autograd.grad(out.total, list(o.aux_raw), allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)  # the auxiliary heads get nothing


def test_preset_no_scaler_uses_raw_aux_logits():
    out = MultiHeadLoss(loss_config("no_scaler"))(make_output(), labels())
    raw = [np.asarray(u, dtype=np.float64) for u in AUX_RAW]
    close(out.ce_aux, 10 * sum(np_ce(u, LABELS) for u in raw))
    sd, md = np_kd(FINAL, raw, MASK_F, MASK_AUX)
    close(out.kd_self, sd)
    close(out.kd_mutual, md)
    # the same as feeding a model output whose aux are unscaled to the full method
    same = MultiHeadLoss(loss_config("mhmd"))(make_output(scaled=False), labels())
    for a, b in zip(out, same):
        torch.testing.assert_close(a, b)
    full = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    assert abs(float(full.kd_self) - float(out.kd_self)) > 1e-4


def test_preset_one_way():
    out = MultiHeadLoss(loss_config("one_way"))(make_output(), labels())
    full = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    assert out.kd_mutual.item() == 0.0
    torch.testing.assert_close(out.kd_self, full.kd_self)
    torch.testing.assert_close(out.ce_aux, full.ce_aux)
    close(out.total, float(full.total) - float(full.kd_mutual))


def test_preset_ungated_uses_all_rows():
    aux = np_scaled()
    log_p = np_log_softmax(FINAL)
    expected = sum(np_kl_sum(log_p, np_log_softmax(a), range(4)) / (4 * K) for a in aux)
    for y in (LABELS, [2, 0, 1, 1]):  # some rows right / no row right: the same KD
        out = MultiHeadLoss(loss_config("ungated"))(make_output(), labels(y))
        close(out.kd_self, expected)
        assert out.kd_mutual.item() == 0.0


def test_preset_coarse_gated():
    aux = np_scaled()
    log_p = np_log_softmax(FINAL)
    all_rows = sum(np_kl_sum(log_p, np_log_softmax(a), range(4)) / (4 * K) for a in aux)
    some_right = MultiHeadLoss(loss_config("coarse_gated"))(make_output(), labels())
    close(some_right.kd_self, all_rows)  # two rows right -> KD over all four rows
    one_right = [0, 0, 1, 1]  # only row 0 right for the final head
    assert (np.argmax(FINAL, axis=1) == one_right).sum() == 1
    close(MultiHeadLoss(loss_config("coarse_gated"))(make_output(), labels(one_right)).kd_self, all_rows)
    none_right = MultiHeadLoss(loss_config("coarse_gated"))(make_output(), labels([2, 0, 1, 1]))
    assert none_right.kd_self.item() == 0.0
    assert some_right.kd_mutual.item() == none_right.kd_mutual.item() == 0.0


def test_batch_gating_of_mutual_direction():
    """gating='batch' with mutual distillation: aux head l teaches on all rows iff it is right on some row."""
    out = MultiHeadLoss(loss_config("mhmd", gating="batch"))(make_output(), labels())
    aux = np_scaled()
    all4, none = [True] * 4, [False] * 4
    sd, md = np_kd(FINAL, aux, all4, [all4, none, all4])
    close(out.kd_self, sd)
    close(out.kd_mutual, md)


# --- gradient flow / detaching the teacher ------------------------------------------------------------------

def _grads(part, leaves):
    gs = torch.autograd.grad(part, leaves, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(gs, leaves)]


def test_teacher_receives_gradient_by_default():
    o = make_output(requires_grad=True)
    out = MultiHeadLoss(loss_config("mhmd"))(o, labels())
    g_final, *g_aux = _grads(out.kd_self, [o.final, *o.aux_raw])
    assert g_final.abs().sum() > 0  # the final head is the teacher of kd_self and still gets gradient
    assert all(g.abs().sum() > 0 for g in g_aux)
    g_final, *g_aux = _grads(out.kd_mutual, [o.final, *o.aux_raw])
    assert g_final.abs().sum() > 0
    assert g_aux[0].abs().sum() > 0 and g_aux[2].abs().sum() > 0  # teachers of kd_mutual
    assert g_aux[1].abs().sum() == 0  # head 1 is right on no row: it takes no part in kd_mutual


def test_teacher_gradient_is_checked_against_finite_differences():
    """d kd_self / d final, the teacher side, is what the explicit formula's derivative says (not detached)."""
    o = make_output(requires_grad=True)
    g, = torch.autograd.grad(MultiHeadLoss(loss_config("one_way"))(o, labels()).kd_self, [o.final])
    aux = np_scaled()
    base = np.asarray(FINAL, dtype=np.float64)
    eps = 1e-6
    for i, c in [(0, 0), (1, 2), (0, 1)]:
        plus, minus = base.copy(), base.copy()
        plus[i, c] += eps
        minus[i, c] -= eps
        num = (np_kd(plus, aux, MASK_F, MASK_AUX)[0] - np_kd(minus, aux, MASK_F, MASK_AUX)[0]) / (2 * eps)
        assert abs(num) > 1e-4
        assert abs(float(g[i, c]) - num) < 1e-5


def test_detach_teacher():
    o = make_output(requires_grad=True)
    out = MultiHeadLoss(loss_config("mhmd", detach_teacher=True))(o, labels())
    ref = MultiHeadLoss(loss_config("mhmd"))(make_output(), labels())
    for a, b in zip(out, ref):  # detaching changes no value
        torch.testing.assert_close(a, b)
    g_final, *g_aux = _grads(out.kd_self, [o.final, *o.aux_raw])
    assert g_final.abs().sum() == 0  # teacher: no gradient
    assert all(g.abs().sum() > 0 for g in g_aux)  # students still learn
    g_final, *g_aux = _grads(out.kd_mutual, [o.final, *o.aux_raw])
    assert g_final.abs().sum() > 0  # the final head is the student of kd_mutual
    assert all(g.abs().sum() == 0 for g in g_aux)


# --- configuration errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"preset": "no_such_preset"}, "no_such_preset"),
    ({"bogus_option": 1}, "bogus_option"),
    ({"aux_weight": -1.0}, "aux_weight"),
    ({"kd_weight": -0.1}, "kd_weight"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -2.0}, "temperature"),
    ({"gating": "sometimes"}, "gating"),
    ({"gating": "sometimes"}, "sometimes"),
    ({"direction": "backwards"}, "direction"),
    ({"reduction": "sum"}, "reduction"),
])
def test_loss_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        loss_config(**kwargs)


def test_loss_config_overrides():
    cfg = loss_config("one_way", gating="none", aux_weight=0.01)
    assert (cfg.direction, cfg.gating, cfg.aux_weight) == ("self", "none", 0.01)
    assert loss_config("ce", aux_weight=None).aux_weight == 0.0  # None values are ignored
    assert loss_config("no_scaler").use_scaler is False
    with pytest.raises(ValueError, match="aux_weight"):
        LossConfig(aux_weight=-1)


@pytest.mark.parametrize("head", [0, 1, 2])
def test_single_aux_head_modes_train_only_that_head(head):
    """Modes 2/3/4: cross-entropy on auxiliary head ``head`` only (unscaled logits), no final-head loss, no KD."""
    out = make_output(requires_grad=True)
    cfg = loss_config(f"ce_aux{head}", aux_weight=10.0)
    res = MultiHeadLoss(cfg)(out, labels())
    want = 10.0 * F.cross_entropy(out.aux_raw[head], labels())
    assert torch.allclose(res.total, want) and res.ce_final == 0 and res.kd_self == 0 and res.kd_mutual == 0
    res.total.backward()
    assert out.final.grad is None or not out.final.grad.any()
    for i, raw in enumerate(out.aux_raw):
        assert (raw.grad is not None and raw.grad.abs().sum() > 0) == (i == head)
    with pytest.raises(ValueError, match="auxiliary heads"):
        MultiHeadLoss(loss_config("ce_aux0", aux_only=3))(make_output(), labels())


# --- a model whose final head has a scaler (the historic ResNet-50): final_scaled --------------------------------

def test_final_scaled_replaces_the_final_logits_when_the_scaler_is_on():
    """The historic ResNet-50 serves the final logits divided by its own temperature; with the scaler on the loss is
    computed on them exactly as on an ordinary final head holding those logits, with the scaler off on ``final``."""
    base = make_output()
    divisor = torch.tensor([0.6, 1.2, 0.9, 1.4])
    scaled_final = base.final / divisor[:, None]
    with_final_scaler = base._replace(final_scaled=(scaled_final,))
    y = labels()
    for preset in ("mhmd", "no_scaler", "one_way"):
        cfg = loss_config(preset)
        got = MultiHeadLoss(cfg)(with_final_scaler, y)
        served = scaled_final if cfg.use_scaler else base.final
        expected = MultiHeadLoss(cfg)(base._replace(final=served), y)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    on = MultiHeadLoss(loss_config("mhmd"))(with_final_scaler, y)
    torch.testing.assert_close(on.ce_final, F.cross_entropy(scaled_final, y))
    assert not torch.allclose(on.ce_final, F.cross_entropy(base.final, y))  # the scaling really enters the loss
    off = MultiHeadLoss(loss_config("mhmd", use_scaler=False))(with_final_scaler, y)
    torch.testing.assert_close(off.ce_final, F.cross_entropy(base.final, y))

"""Every registered logit distiller against a hand computation.

Expected values are computed in plain Python (``math.exp`` / ``math.log`` on lists) or, for gradients, with autograd
through an explicit float64 formula built from elementary tensor ops (exp, log, sum) - never with the
``log_softmax`` / ``kl_div`` calls the implementation uses.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_kd import ModelView, build_distiller, list_distillers
from hf_kd.distillers import (
    DKDDistiller,
    JSDDistiller,
    KLDistiller,
    LogitMSEDistiller,
    ReverseKLDistiller,
    SkewKLDistiller,
    SkewReverseKLDistiller,
    TVDDistiller,
)

# 2 rows x 3 classes.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]
TARGETS = [2, 0]


# ---- plain-Python reference -------------------------------------------------------------------------------------
def softmax(row, temperature=1.0):
    scaled = [z / temperature for z in row]
    top = max(scaled)
    exps = [math.exp(z - top) for z in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    """KL(p || q) = sum_c p_c log(p_c / q_c)."""
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p, q) if pc > 0)


def mix(p, q, weight_p):
    return [weight_p * pc + (1 - weight_p) * qc for pc, qc in zip(p, q)]


def hand_row(name, s, t, y, temperature=1.0, **options):
    """One row's loss, written out from the papers' definitions."""
    T = temperature
    ps, pt = softmax(s, T), softmax(t, T)
    if name == "kl":
        return T * T * kl(pt, ps)
    if name == "reverse_kl":
        return T * T * kl(ps, pt)
    if name == "jsd":
        beta = options.get("beta", 0.5)
        if beta == 0.0:
            return T * T * kl(pt, ps)
        if beta == 1.0:
            return T * T * kl(ps, pt)
        m = mix(pt, ps, beta)
        return T * T * (beta * kl(pt, m) + (1 - beta) * kl(ps, m))
    if name == "skew_kl":
        alpha = options.get("alpha", 0.1)
        return T * T * kl(pt, mix(pt, ps, alpha))
    if name == "skew_reverse_kl":
        alpha = options.get("alpha", 0.1)
        return T * T * kl(ps, mix(ps, pt, alpha))
    if name == "tvd":
        return T * T * 0.5 * sum(abs(a - b) for a, b in zip(pt, ps))
    if name == "mse":  # raw logits, no temperature
        return sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)
    if name == "dkd":
        alpha, beta = options.get("alpha", 1.0), options.get("beta", 8.0)
        bt, bs = [pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]]
        tckd = kl(bt, bs)
        others = [c for c in range(len(s)) if c != y]
        nt, ns = softmax([t[c] for c in others], T), softmax([s[c] for c in others], T)
        nckd = kl(nt, ns)
        return T * T * (alpha * tckd + beta * nckd)
    raise KeyError(name)


def approx(expected, rel=1e-5, abs=1e-6):
    return pytest.approx(expected, rel=rel, abs=abs)


def row_loss(distiller, student=STUDENT, teacher=TEACHER, targets=TARGETS):
    out = distiller.row_loss(
        torch.tensor(student, dtype=torch.float32),
        torch.tensor(teacher, dtype=torch.float32),
        None if targets is None else torch.tensor(targets),
    )
    assert out.shape == (len(student),) and out.dtype == torch.float32
    return out.tolist()


# ---- explicit float64 torch formula, for autograd comparisons ---------------------------------------------------
def t_softmax(z):
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def t_kl(p, q):
    return (p * (torch.log(p) - torch.log(q))).sum(-1)


def explicit_rows(name, s, t, y, temperature=1.0, **options):
    T = temperature
    ps, pt = t_softmax(s / T), t_softmax(t / T)
    if name == "kl":
        return T * T * t_kl(pt, ps)
    if name == "reverse_kl":
        return T * T * t_kl(ps, pt)
    if name == "jsd":
        beta = options.get("beta", 0.5)
        m = beta * pt + (1 - beta) * ps
        return T * T * (beta * t_kl(pt, m) + (1 - beta) * t_kl(ps, m))
    if name == "skew_kl":
        alpha = options.get("alpha", 0.1)
        return T * T * t_kl(pt, alpha * pt + (1 - alpha) * ps)
    if name == "skew_reverse_kl":
        alpha = options.get("alpha", 0.1)
        return T * T * t_kl(ps, alpha * ps + (1 - alpha) * pt)
    if name == "tvd":
        return T * T * 0.5 * (pt - ps).abs().sum(-1)
    if name == "mse":
        return ((s - t) ** 2).sum(-1) / s.shape[-1]
    if name == "dkd":
        alpha, beta = options.get("alpha", 1.0), options.get("beta", 8.0)
        onehot = torch.zeros_like(s)
        onehot[torch.arange(len(y)), y] = 1.0
        ps_y, pt_y = (ps * onehot).sum(-1), (pt * onehot).sum(-1)
        tckd = pt_y * torch.log(pt_y / ps_y) + (1 - pt_y) * torch.log((1 - pt_y) / (1 - ps_y))
        # distributions over the non-target classes: renormalised probabilities without the target
        qs, qt = ps * (1 - onehot), pt * (1 - onehot)
        qs, qt = qs / qs.sum(-1, keepdim=True), qt / qt.sum(-1, keepdim=True)
        keep = onehot == 0
        nckd = (qt * torch.where(keep, torch.log(qt.clamp_min(1e-300)) - torch.log(qs.clamp_min(1e-300)), 0.0)).sum(-1)
        return T * T * (alpha * tckd + beta * nckd)
    raise KeyError(name)


# ---- the registry -----------------------------------------------------------------------------------------------
LOGIT_DISTILLERS = ["dkd", "jsd", "kl", "mse", "reverse_kl", "skew_kl", "skew_reverse_kl", "tvd"]


def test_registry_holds_the_logit_distillers():
    assert set(LOGIT_DISTILLERS) <= set(list_distillers())
    classes = {
        "kl": KLDistiller, "reverse_kl": ReverseKLDistiller, "jsd": JSDDistiller, "skew_kl": SkewKLDistiller,
        "skew_reverse_kl": SkewReverseKLDistiller, "tvd": TVDDistiller, "mse": LogitMSEDistiller, "dkd": DKDDistiller,
    }
    for name, cls in classes.items():
        assert type(build_distiller({"name": name})) is cls


# ---- closed-form sanity checks (no helper involved) -------------------------------------------------------------
def test_kl_closed_form_two_classes():
    # teacher probs [3/4, 1/4] (logits [ln 3, 0]); student probs [1/2, 1/2]
    teacher = [[math.log(3.0), 0.0]]
    student = [[0.0, 0.0]]
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert row_loss(KLDistiller(), student, teacher) == approx([expected])
    # reverse: 1/2 ln(2/3) + 1/2 ln(2)
    assert row_loss(ReverseKLDistiller(), student, teacher) == approx([0.5 * math.log(2 / 3) + 0.5 * math.log(2.0)])
    # TVD: 0.5 * (|3/4 - 1/2| + |1/4 - 1/2|) = 1/4
    assert row_loss(TVDDistiller(), student, teacher) == approx([0.25])
    # MSE: ((0 - ln 3)^2 + 0) / 2
    assert row_loss(LogitMSEDistiller(), student, teacher) == approx([math.log(3.0) ** 2 / 2])


def test_temperature_scales_logits_and_multiplies_by_t_squared():
    # T = 2: teacher logits [2 ln 3, 0] / 2 -> probs [3/4, 1/4]; the result is 4 * KL.
    teacher = [[2 * math.log(3.0), 0.0]]
    student = [[0.0, 0.0]]
    expected = 4.0 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert row_loss(KLDistiller(temperature=2.0), student, teacher) == approx([expected])


def test_identical_logits_give_zero_for_every_distiller():
    for name in LOGIT_DISTILLERS:
        out = row_loss(build_distiller({"name": name}), STUDENT, STUDENT)
        assert out == approx([0.0, 0.0], abs=1e-6), name


# ---- every distiller, T = 1 and T != 1 -------------------------------------------------------------------------
CASES = [
    ("kl", {}), ("reverse_kl", {}), ("jsd", {}), ("jsd", {"beta": 0.3}), ("skew_kl", {}), ("skew_kl", {"alpha": 0.4}),
    ("skew_reverse_kl", {}), ("skew_reverse_kl", {"alpha": 0.4}), ("tvd", {}), ("dkd", {"alpha": 1.5, "beta": 2.0}),
]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("name,options", CASES)
def test_row_loss_matches_hand_computation(name, options, temperature):
    distiller = build_distiller({"name": name, "temperature": temperature, **options})
    expected = [hand_row(name, s, t, y, temperature, **options) for s, t, y in zip(STUDENT, TEACHER, TARGETS)]
    assert row_loss(distiller) == approx(expected)


def test_mse_uses_raw_logits_and_has_no_temperature():
    expected = [sum((a - b) ** 2 for a, b in zip(s, t)) / 3 for s, t in zip(STUDENT, TEACHER)]
    # row 0: (1-2)^2 + (2-0)^2 + (0.5-1)^2 = 5.25 -> 1.75 ; row 1: 1 + 4 + 25 = 30 -> 10
    assert expected == approx([1.75, 10.0])
    assert row_loss(LogitMSEDistiller()) == approx(expected)
    assert row_loss(LogitMSEDistiller(weight=3.0)) == approx(expected)  # weight is applied by the trainer


def test_temperature_changes_the_value():
    """Guards against a T that is ignored or applied once: T^2 * KL(T) differs from KL(1) and from KL(T)."""
    at_1 = row_loss(KLDistiller(temperature=1.0))
    at_3 = row_loss(KLDistiller(temperature=3.0))
    kl_only = [kl(softmax(t, 3.0), softmax(s, 3.0)) for s, t in zip(STUDENT, TEACHER)]
    assert at_3 == approx([9 * v for v in kl_only])
    assert at_3 != approx(at_1) and at_3 != approx(kl_only)


# ---- JSD and skew limits -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_beta_limits_are_forward_and_reverse_kl(temperature):
    forward = [hand_row("kl", s, t, y, temperature) for s, t, y in zip(STUDENT, TEACHER, TARGETS)]
    reverse = [hand_row("reverse_kl", s, t, y, temperature) for s, t, y in zip(STUDENT, TEACHER, TARGETS)]
    assert row_loss(JSDDistiller(temperature=temperature, beta=0.0)) == approx(forward)
    assert row_loss(JSDDistiller(temperature=temperature, beta=1.0)) == approx(reverse)
    assert forward != approx(reverse)  # the two limits are really different here


def test_jsd_interior_beta_by_hand():
    beta, T = 0.3, 1.0
    expected = []
    for s, t in zip(STUDENT, TEACHER):
        ps, pt = softmax(s), softmax(t)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        kl_t = sum(a * math.log(a / c) for a, c in zip(pt, m))
        kl_s = sum(b * math.log(b / c) for b, c in zip(ps, m))
        expected.append(beta * kl_t + (1 - beta) * kl_s)
    assert row_loss(JSDDistiller(temperature=T, beta=beta)) == approx(expected)
    # symmetric JSD (beta = 0.5) is bounded by ln 2
    assert all(0 < v < math.log(2) for v in row_loss(JSDDistiller(beta=0.5)))


def test_skew_kl_alpha_zero_is_forward_kl():
    forward = [kl(softmax(t, 2.0), softmax(s, 2.0)) * 4 for s, t in zip(STUDENT, TEACHER)]
    assert row_loss(SkewKLDistiller(temperature=2.0, alpha=0.0)) == approx(forward)


def test_skew_reverse_kl_alpha_zero_is_reverse_kl():
    reverse = [kl(softmax(s, 2.0), softmax(t, 2.0)) * 4 for s, t in zip(STUDENT, TEACHER)]
    assert row_loss(SkewReverseKLDistiller(temperature=2.0, alpha=0.0)) == approx(reverse)


@pytest.mark.parametrize("alpha", [1e-6, 1e-3])
def test_skew_kl_tends_to_forward_kl_and_skew_reverse_to_reverse_kl_as_alpha_tends_to_zero(alpha):
    forward = [kl(softmax(t, 2.0), softmax(s, 2.0)) * 4 for s, t in zip(STUDENT, TEACHER)]
    reverse = [kl(softmax(s, 2.0), softmax(t, 2.0)) * 4 for s, t in zip(STUDENT, TEACHER)]
    assert row_loss(SkewKLDistiller(temperature=2.0, alpha=alpha)) == approx(forward, rel=5 * alpha, abs=1e-5)
    assert row_loss(SkewReverseKLDistiller(temperature=2.0, alpha=alpha)) == approx(reverse, rel=5 * alpha, abs=1e-5)


def test_skew_kl_interior_alpha_by_hand():
    alpha = 0.1
    s, t = STUDENT[0], TEACHER[0]
    ps, pt = softmax(s), softmax(t)
    m = [alpha * pt[c] + (1 - alpha) * ps[c] for c in range(3)]
    expected = sum(pt[c] * math.log(pt[c] / m[c]) for c in range(3))
    got = row_loss(SkewKLDistiller(alpha=alpha))[0]
    assert got == approx(expected)
    # skewing towards the teacher makes the divergence smaller than plain KL
    assert got < kl(pt, ps)
    m_rev = [alpha * ps[c] + (1 - alpha) * pt[c] for c in range(3)]
    expected_rev = sum(ps[c] * math.log(ps[c] / m_rev[c]) for c in range(3))
    assert row_loss(SkewReverseKLDistiller(alpha=alpha))[0] == approx(expected_rev)


# ---- DKD ---------------------------------------------------------------------------------------------------------
DKD_S = [[2.0, 1.0, 0.0, -1.0], [0.5, -0.5, 1.5, 1.0]]
DKD_T = [[3.0, -1.0, 0.5, 0.0], [0.0, 1.0, 2.0, -1.0]]
DKD_Y = [0, 2]


def dkd_parts_by_hand(T):
    """(TCKD, NCKD) of each row, written out for the 2 x 4 example."""
    parts = []
    for s, t, y in zip(DKD_S, DKD_T, DKD_Y):
        es = [math.exp(z / T) for z in s]
        et = [math.exp(z / T) for z in t]
        ps_y, pt_y = es[y] / sum(es), et[y] / sum(et)
        tckd = pt_y * math.log(pt_y / ps_y) + (1 - pt_y) * math.log((1 - pt_y) / (1 - ps_y))
        rest_s = sum(es) - es[y]
        rest_t = sum(et) - et[y]
        nckd = 0.0
        for c in range(4):
            if c == y:
                continue
            qs, qt = es[c] / rest_s, et[c] / rest_t
            nckd += qt * math.log(qt / qs)
        parts.append((tckd, nckd))
    return parts


def dkd_rows(distiller):
    return row_loss(distiller, DKD_S, DKD_T, DKD_Y)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_tckd_and_nckd_by_hand(T):
    parts = dkd_parts_by_hand(T)
    assert dkd_rows(DKDDistiller(temperature=T, alpha=1.0, beta=0.0)) == approx([T * T * a for a, _ in parts])
    assert dkd_rows(DKDDistiller(temperature=T, alpha=0.0, beta=1.0)) == approx([T * T * b for _, b in parts])
    alpha, beta = 1.5, 2.0
    expected = [T * T * (alpha * a + beta * b) for a, b in parts]
    assert dkd_rows(DKDDistiller(temperature=T, alpha=alpha, beta=beta)) == approx(expected)
    assert all(a > 1e-4 and b > 1e-4 for a, b in parts)  # both parts contribute


def test_dkd_defaults_are_mdistiller_cifar():
    d = DKDDistiller()
    assert (d.alpha, d.beta, d.temperature, d.warmup_steps) == (1.0, 8.0, 4.0, 0)
    parts = dkd_parts_by_hand(4.0)
    assert dkd_rows(d) == approx([16 * (a + 8 * b) for a, b in parts])


def test_dkd_target_class_matters():
    a = dkd_rows(DKDDistiller(temperature=1.0))
    b = row_loss(DKDDistiller(temperature=1.0), DKD_S, DKD_T, [1, 3])
    assert a != approx(b)


def test_dkd_warmup_ramp():
    distiller = DKDDistiller(temperature=2.0, alpha=1.0, beta=2.0, warmup_steps=10)
    full = [4 * (a + 2 * b) for a, b in dkd_parts_by_hand(2.0)]
    expected_ramp = {0: 0.0, 1: 0.1, 5: 0.5, 9: 0.9, 10: 1.0, 25: 1.0}
    for step, ramp in expected_ramp.items():
        distiller.set_progress(step, 100)
        assert distiller.global_step == step
        assert dkd_rows(distiller) == approx([ramp * v for v in full]), step


def test_dkd_without_targets_raises():
    with pytest.raises(ValueError, match="dkd needs `labels`"):
        row_loss(DKDDistiller(), DKD_S, DKD_T, None)
    view_s = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(DKD_S))
    view_t = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(DKD_T))
    with pytest.raises(ValueError, match="dkd needs `labels`"):
        DKDDistiller()(view_s, view_t, {})


# ---- forward(): classifier --------------------------------------------------------------------------------------
ALL = [(name, {}) for name in LOGIT_DISTILLERS if name != "mse"] + [("jsd", {"beta": 0.3}), ("dkd", {"beta": 2.0})]


@pytest.mark.parametrize("name,options", ALL + [("mse", {})])
def test_forward_classification_is_mean_over_rows(name, options):
    kwargs = {} if name == "mse" else {"temperature": 2.0}
    distiller = build_distiller({"name": name, **kwargs, **options})
    view_s = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(STUDENT))
    view_t = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(TEACHER))
    loss = distiller(view_s, view_t, {"labels": torch.tensor(TARGETS)})
    temperature = kwargs.get("temperature", 1.0)
    rows = [hand_row(name, s, t, y, temperature, **options) for s, t, y in zip(STUDENT, TEACHER, TARGETS)]
    assert loss.dim() == 0
    assert loss.item() == approx(sum(rows) / 2)


def test_forward_classification_weight_is_not_applied():
    """``forward`` returns the unweighted loss; the trainer multiplies by ``weight``."""
    view_s = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(STUDENT))
    view_t = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(TEACHER))
    a = KLDistiller(weight=1.0)(view_s, view_t, {}).item()
    b = KLDistiller(weight=5.0)(view_s, view_t, {}).item()
    assert a == approx(b)
    assert a == approx(sum(kl(softmax(t), softmax(s)) for s, t in zip(STUDENT, TEACHER)) / 2)


# ---- forward(): causal LM ---------------------------------------------------------------------------------------
B, SEQ, V = 2, 4, 5
LABELS = [[-100, 3, 1, -100], [2, -100, 4, 0]]
# position t predicts label t+1: valid (b, t) = (0, 0)->3, (0, 1)->1, (1, 1)->4, (1, 2)->0
VALID = [(0, 0, 3), (0, 1, 1), (1, 1, 4), (1, 2, 0)]


def lm_logits(seed):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(B, SEQ, V, generator=g)).tolist()


S_LM, T_LM = lm_logits(1), lm_logits(2)


def lm_batch():
    return {
        "input_ids": torch.tensor([[4, 3, 1, 2], [2, 0, 4, 1]]),  # ids < V
        "attention_mask": torch.ones(B, SEQ, dtype=torch.long),
        "labels": torch.tensor(LABELS),
    }


def lm_views(student=None):
    student = torch.tensor(S_LM) if student is None else student
    return (
        ModelView(model=nn.Identity(), task="causal_lm", logits=student),
        ModelView(model=nn.Identity(), task="causal_lm", logits=torch.tensor(T_LM)),
    )


@pytest.mark.parametrize("name,options", ALL + [("mse", {})])
def test_forward_causal_lm_shift_and_token_normalisation(name, options):
    kwargs = {} if name == "mse" else {"temperature": 2.0}
    distiller = build_distiller({"name": name, **kwargs, **options})
    loss = distiller(*lm_views(), lm_batch())
    temperature = kwargs.get("temperature", 1.0)
    total = sum(hand_row(name, S_LM[b][t], T_LM[b][t], y, temperature, **options) for b, t, y in VALID)
    assert loss.item() == approx(total / len(VALID))


def test_causal_lm_shift_is_not_off_by_one():
    """The unshifted pairing (position t with label t) gives a different number, so the test above can fail."""
    loss = KLDistiller(temperature=2.0)(*lm_views(), lm_batch()).item()
    unshifted = [(b, t) for b in range(B) for t in range(SEQ) if LABELS[b][t] != -100]
    wrong = sum(4 * kl(softmax(T_LM[b][t], 2.0), softmax(S_LM[b][t], 2.0)) for b, t in unshifted) / len(unshifted)
    assert loss != approx(wrong)


def test_causal_lm_without_labels_uses_attention_mask_and_next_input_id():
    batch = lm_batch()
    del batch["labels"]
    batch["attention_mask"] = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids = batch["input_ids"].tolist()
    valid = [(0, 0, ids[0][1]), (0, 1, ids[0][2]), (1, 0, ids[1][1]), (1, 1, ids[1][2]), (1, 2, ids[1][3])]
    loss = DKDDistiller(temperature=1.0, beta=2.0)(*lm_views(), batch)
    expected = sum(hand_row("dkd", S_LM[b][t], T_LM[b][t], y, 1.0, beta=2.0) for b, t, y in valid) / len(valid)
    assert loss.item() == approx(expected)


@pytest.mark.parametrize("name", ["kl", "jsd", "dkd", "tvd"])
def test_chunked_equals_unchunked(name):
    distiller = build_distiller({"name": name, "temperature": 2.0})
    results = {}
    for chunk in (1, 3, 1024):
        student = torch.tensor(S_LM, requires_grad=True)
        loss = distiller(*lm_views(student), lm_batch(), chunk_size=chunk)
        loss.backward()
        results[chunk] = (loss.item(), student.grad.clone())
    for chunk in (1, 3):
        assert results[chunk][0] == approx(results[1024][0], rel=1e-6)
        torch.testing.assert_close(results[chunk][1], results[1024][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,options", ALL + [("mse", {})])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_gradient_matches_autograd_of_explicit_formula(name, options, chunk):
    kwargs = {} if name == "mse" else {"temperature": 2.0}
    distiller = build_distiller({"name": name, **kwargs, **options})
    student = torch.tensor(S_LM, requires_grad=True)
    loss = distiller(*lm_views(student), lm_batch(), chunk_size=chunk)
    loss.backward()

    reference = torch.tensor(S_LM, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(T_LM, dtype=torch.float64)
    b_idx = torch.tensor([b for b, _, _ in VALID])
    t_idx = torch.tensor([t for _, t, _ in VALID])
    y = torch.tensor([y for _, _, y in VALID])
    rows = explicit_rows(name, reference[b_idx, t_idx], teacher[b_idx, t_idx], y, kwargs.get("temperature", 1.0),
                         **options)
    expected = rows.sum() / len(VALID)
    expected.backward()

    assert loss.item() == approx(expected.item())
    torch.testing.assert_close(student.grad, reference.grad.float(), rtol=1e-4, atol=1e-6)
    # positions that predict nothing (label -100 next, or the last position) get exactly zero gradient
    used = torch.zeros(B, SEQ, dtype=torch.bool)
    used[b_idx, t_idx] = True
    assert torch.all(student.grad[~used] == 0)
    assert student.grad[used].abs().sum() > 0


def test_gradient_on_classifier_logits():
    student = torch.tensor(STUDENT, requires_grad=True)
    view_s = ModelView(model=nn.Identity(), task="classification", logits=student)
    view_t = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(TEACHER))
    KLDistiller(temperature=2.0)(view_s, view_t, {}).backward()
    # d/dz_s [T^2 KL(p_t || softmax(z_s / T))] / n = T (p_s - p_t) / n
    expected = [[2.0 * (a - b) / 2 for a, b in zip(softmax(s, 2.0), softmax(t, 2.0))] for s, t in zip(STUDENT, TEACHER)]
    torch.testing.assert_close(student.grad, torch.tensor(expected), rtol=1e-5, atol=1e-7)

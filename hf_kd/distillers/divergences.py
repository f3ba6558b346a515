"""Per-row divergences between two sets of logits.

Every function takes ``student`` and ``teacher`` logits of shape ``[n, C]`` (already divided by the temperature,
fp32) and returns ``[n]``: one value per sample (classifier) or per token (causal LM). ``KL(p || q)`` is
``sum_c p_c (log p_c - log q_c)`` with ``0 log 0 = 0``, so teacher logits at ``-inf`` (a masked vocabulary) are
handled wherever the divergence is finite (forward KL, JSD, skew KLs, TVD); reverse KL and logit MSE are infinite
there by definition, and the trainer's non-finite check names them. :func:`tempered` applies a temperature and
the ``T^2`` factor; reductions are applied by the distillers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import sparse_logits


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row from log-probabilities; entries where ``p = 0`` (``log_p = -inf``) contribute 0."""
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    if not bool(torch.isnan(kl).any()):  # a check over rows only: the full-size masked form below is 3x slower
        return kl
    possible = log_p != float("-inf")  # NaN inputs stay NaN (the trainer's non-finite check names them)
    # Where p = 0 both logs are replaced by 0, so the term is exactly 0 with a zero (not NaN) gradient.
    log_p, log_q = log_p.masked_fill(~possible, 0.0), log_q.masked_fill(~possible, 0.0)
    return (log_p.exp() * possible * (log_p - log_q)).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || p_s)``: mode-covering (Hinton et al., 2015). A top-k teacher (``SparseLogits``) is read in O(k)."""
    if isinstance(teacher, sparse_logits.SparseLogits):
        return sparse_logits.forward_kl(student, teacher)
    return kl_from_log_probs(teacher.log_softmax(-1), student.log_softmax(-1))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``KL(p_s || p_t)``: mode-seeking (MiniLLM, Gu et al., 2024). A top-k teacher (``SparseLogits``) is read in
    O(k)."""
    if isinstance(teacher, sparse_logits.SparseLogits):
        return sparse_logits.reverse_kl(student, teacher)
    return kl_from_log_probs(student.log_softmax(-1), teacher.log_softmax(-1))


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """``log(weight_p * p + (1 - weight_p) * q)``, computed stably."""
    if weight_p == 0.0:
        return log_q
    if weight_p == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), as TRL defines it.

    ``M = beta * p_t + (1 - beta) * p_s`` and ``JSD_beta = beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)``.
    ``beta = 0`` is defined as forward ``KL(p_t || p_s)`` and ``beta = 1`` as reverse ``KL(p_s || p_t)``.
    """
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    if beta == 0.0:
        return kl_from_log_probs(log_t, log_s)
    if beta == 1.0:
        return kl_from_log_probs(log_s, log_t)
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * kl_from_log_probs(log_t, log_m) + (1.0 - beta) * kl_from_log_probs(log_s, log_m)


def skew_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al., 2024): ``KL(p_t || alpha * p_t + (1 - alpha) * p_s)``."""
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return kl_from_log_probs(log_t, _log_mixture(log_t, log_s, alpha))


def skew_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: ``KL(p_s || (1 - alpha) * p_t + alpha * p_s)``."""
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    return kl_from_log_probs(log_s, _log_mixture(log_s, log_t, alpha))


def total_variation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_c |p_t - p_s|``."""
    return 0.5 * (teacher.softmax(-1) - student.softmax(-1)).abs().sum(-1)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error between raw logits, averaged over classes: ``mean_c (z_s - z_t)^2``."""
    return (student - teacher).pow(2).mean(-1)


def decoupled_kd(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary distributions ``[p_y, 1 - p_y]``, NCKD the KL between the distributions over
    the non-target classes. Every log-probability comes from a logsumexp, never from a clamped probability:
    ``log p_y = z_y - lse(z)``, ``log(1 - p_y) = lse(z_{c != y}) - lse(z)``, and the non-target distribution is the
    softmax with the target logit at ``-inf`` (mdistiller subtracts 1000 instead), so the loss and its gradient stay
    exact for saturated logits.
    """
    target_mask = F.one_hot(targets, student.shape[-1]).bool()

    def binary_and_rest(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rest = logits.masked_fill(target_mask, float("-inf"))
        lse_all, lse_rest = logits.logsumexp(-1), rest.logsumexp(-1)
        target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        binary = torch.stack([target - lse_all, lse_rest - lse_all], dim=-1)  # log [p_y, 1 - p_y]
        return binary, rest.log_softmax(-1)

    binary_s, rest_s = binary_and_rest(student)
    binary_t, rest_t = binary_and_rest(teacher)
    tckd = kl_from_log_probs(binary_t, binary_s)
    nckd = kl_from_log_probs(rest_t, rest_s)
    return alpha * tckd + beta * nckd


def rectified(teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DR-KD's rectified teacher logits (Amik et al., "Dynamic Rectification Knowledge Distillation",
    https://huggingface.co/papers/2201.11319): in each row where the teacher's argmax ``k = argmax_c z_c`` is not the
    true class ``y``, the logits of ``k`` and ``y`` are swapped, ``z~_k = z_y`` and ``z~_y = z_k``; rows where the
    teacher is right are unchanged (the swap of a class with itself). With tied maxima ``k`` is the first of them,
    and a true class among them leaves the row's values unchanged.

    ``teacher`` is ``[n, C]``, ``targets`` ``[n]`` (true class or next token per row); a new tensor is returned and
    ``teacher`` is left as it is (other terms of the row pass read it too).
    """
    predicted, target = teacher.argmax(-1, keepdim=True), targets.unsqueeze(-1)
    z_predicted, z_target = teacher.gather(-1, predicted), teacher.gather(-1, target)
    return teacher.scatter(-1, predicted, z_target).scatter(-1, target, z_predicted)


def tempered(
    divergence: Callable[..., torch.Tensor], student: torch.Tensor, teacher: torch.Tensor, temperature: float,
    *args: Any,
) -> torch.Tensor:
    """``T^2 * divergence(z_s / T, z_t / T, *args)`` per row: the temperature softens both distributions and ``T^2``
    keeps the gradients' scale independent of ``T`` (Hinton et al., 2015, https://huggingface.co/papers/1503.02531).
    The caller detaches whichever side must not learn."""
    return divergence(student / temperature, teacher / temperature, *args) * (temperature * temperature)


def tempered_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` per row: :func:`tempered` :func:`forward_kl`."""
    return tempered(forward_kl, student, teacher, temperature)

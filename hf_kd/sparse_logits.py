"""A teacher's logits kept as its top k and one tail bucket: how a top-k offline cache (:mod:`hf_kd.cache`) hands
the teacher to the logit distillers without ever forming ``[B, T, V]``.

:class:`SparseLogits` stands for logits ``z`` of width ``V``::

    z_i = values_i        for the k indices i (the teacher's own top-k logits)
    z_j = rest            for every other j  (one shared value: the tail mass spread evenly, see ``from_tail``)

Dividing by a temperature divides ``values`` and ``rest``, so ``divergences.tempered`` applies ``T`` exactly as it
does to the dense ``z`` (:meth:`SparseLogits.dense`). Forward and reverse KL read it directly
(:func:`forward_kl`, :func:`reverse_kl`): O(k) per row on the teacher's side, the student's own softmax over ``V``
on the other; every other divergence reads :meth:`dense`, one chunk of rows at a time. Both give the loss of the
dense ``z``, to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseLogits:
    """Top-k logits ``values`` ``[..., k]`` at ``indices`` ``[..., k]`` and the logit ``rest`` ``[...]`` of each of the
    other ``width - k`` entries (``-inf`` when ``k == width``)."""

    values: torch.Tensor
    indices: torch.Tensor
    rest: torch.Tensor
    width: int

    @classmethod
    def from_tail(cls, values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, width: int) -> SparseLogits:
        """The cached form: ``tail`` is ``log(1 - sum_i p_i)``, the log of the teacher's probability mass outside its
        top k. With ``lse = logsumexp(values) - log(1 - exp(tail))`` (the teacher's ``logsumexp`` over all ``V``
        logits, recovered from the top-k values and the tail mass), ``rest = lse + tail - log(V - k)``: each of the
        other entries gets ``exp(tail) / (V - k)`` of the mass, so the top-k probabilities are the teacher's exactly
        and the tail mass is kept whole."""
        values, tail = values.float(), tail.float()
        k = values.shape[-1]
        if k == width:
            rest = torch.full_like(tail, -math.inf)
        else:
            rest = values.logsumexp(-1) - torch.log1p(-tail.exp()) + tail - math.log(width - k)
        return cls(values, indices.long(), rest, width)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __truediv__(self, temperature: float) -> SparseLogits:
        return SparseLogits(self.values / temperature, self.indices, self.rest / temperature, self.width)

    def __getitem__(self, rows) -> SparseLogits:
        return SparseLogits(self.values[rows], self.indices[rows], self.rest[rows], self.width)

    def flat(self) -> SparseLogits:
        """The same logits with the leading dimensions flattened to one row dimension."""
        return SparseLogits(self.values.reshape(-1, self.k), self.indices.reshape(-1, self.k), self.rest.reshape(-1),
                            self.width)

    def dense(self) -> torch.Tensor:
        """The logits ``z`` ``[..., width]`` this stands for."""
        return self.rest.unsqueeze(-1).expand(*self.rest.shape, self.width).clone().scatter_(
            -1, self.indices, self.values)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p_i [..., k], log p_rest [...])`` of ``softmax(z)``: the top-k entries' and each other entry's."""
        others = self.width - self.k
        if others == 0:
            normalizer = self.values.logsumexp(-1)
        else:
            normalizer = torch.logaddexp(self.values.logsumexp(-1), self.rest + math.log(others))
        return self.values - normalizer.unsqueeze(-1), self.rest - normalizer


def forward_kl(student: torch.Tensor, teacher: SparseLogits) -> torch.Tensor:
    """``KL(p_t || p_s)`` per row for dense student logits ``[n, V]``. With ``c`` each tail entry's probability and
    ``log q = log_softmax(student)``::

        KL = sum_i p_i (log p_i - log q_i) + c * sum_tail (log c - log q_j)
        sum_tail log q_j = sum_V log q - sum_i log q_i

    so the teacher side costs O(k) and the student's O(V) terms are one ``log_softmax`` and one sum. The gradient is
    written out, ``dKL / dz_s = s q - p~`` with ``p~`` the dense teacher distribution (``p_i`` on the top k, ``c``
    elsewhere) and ``s = sum_i p_i + (V - k) c`` (1 up to rounding): one ``exp`` over ``[n, V]`` in the backward
    pass instead of autograd's chain through ``log_softmax``, ``gather`` and ``sum``. A teacher whose tensors
    require grad (trained online) takes the autograd form, which also differentiates the teacher side."""
    if teacher.values.requires_grad or teacher.rest.requires_grad:
        return _forward_kl(student, teacher)[0]
    return _SparseForwardKL.apply(student, teacher.values, teacher.indices, teacher.rest, teacher.width)


def _forward_kl(student: torch.Tensor, teacher: SparseLogits) -> tuple[torch.Tensor, ...]:
    """``(KL, log q, p, c, s)``: the loss and what its gradient reads."""
    log_p, log_c = teacher.log_probs()
    p, c = log_p.exp(), log_c.exp()
    log_q = student.log_softmax(-1)
    log_q_top = log_q.gather(-1, teacher.indices)
    loss = (p * (log_p - log_q_top)).sum(-1)
    others = teacher.width - teacher.k
    if others == 0:
        return loss, log_q, p, torch.zeros_like(c), p.sum(-1)
    c = torch.where(c > 0, c, torch.zeros_like(c))
    log_q_tail = log_q.sum(-1) - log_q_top.sum(-1)
    tail = torch.where(c > 0, others * c * log_c - c * log_q_tail, torch.zeros_like(c))
    return loss + tail, log_q, p, c, p.sum(-1) + others * c


class _SparseForwardKL(torch.autograd.Function):
    """:func:`forward_kl` for a frozen teacher, with the closed-form student gradient."""

    @staticmethod
    def forward(ctx, student, values, indices, rest, width):
        loss, log_q, p, c, s = _forward_kl(student, SparseLogits(values, indices, rest, width))
        ctx.save_for_backward(log_q, p, c, s, indices)
        return loss

    @staticmethod
    def backward(ctx, grad):
        log_q, p, c, s, indices = ctx.saved_tensors
        g = log_q.exp().mul_(s.unsqueeze(-1)).sub_(c.unsqueeze(-1))  # s q - c everywhere
        g.scatter_add_(-1, indices, c.unsqueeze(-1) - p)  # s q - p_i on the top k
        return g.mul_(grad.unsqueeze(-1)), None, None, None, None


def reverse_kl(student: torch.Tensor, teacher: SparseLogits) -> torch.Tensor:
    """``KL(p_s || p_t)`` per row for dense student logits ``[n, V]``: ``sum_V q log q - sum_i q_i log p_i -
    (1 - sum_i q_i) log p_rest`` (O(k) on the teacher's side)."""
    log_p, log_c = teacher.log_probs()
    log_q = student.log_softmax(-1)
    q = log_q.exp()
    q_top = q.gather(-1, teacher.indices)
    loss = (q * log_q).sum(-1) - (q_top * log_p).sum(-1)
    if teacher.width == teacher.k:
        return loss
    return loss - (1 - q_top.sum(-1)).clamp_min(0) * log_c

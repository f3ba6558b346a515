"""How closely the student follows the teacher, measured in evaluation from the views the eval loop already has.

Per evaluated row ``r`` (a sample of a classifier, a predicted token of a causal LM: the rows the losses use, see
:func:`~hf_kd.row_loss.rows_from_views`), with ``s_r`` and ``t_r`` the student's and the teacher's logits::

    agree_r = [argmax_c s_r[c] == argmax_c t_r[c]]                          (top-1 agreement, 0 or 1)
    kl_r    = KL(p_t || p_s) = sum_c p_t[c] * (log p_t[c] - log p_s[c]),   p = softmax(logits)  (temperature 1)

:func:`agreement_per_sample` returns ``(sum_r agree_r, sum_r kl_r, number of rows)`` per sample of one batch, so that
the reported metrics (``eval_teacher_agreement``, ``eval_kl_to_teacher``) are means over every row of the evaluation
set (the samples gathered over processes with the last batch's padding repeats dropped, then sums and counts added
and divided), not means of batch means.

The logits come from the views as the losses read them: a logits tensor, or on the fused causal-LM path the head's
input and weights, formed chunk by chunk (:func:`~hf_kd.row_loss.row_values`), so no ``[B, T, V]`` tensor is built;
a top-k teacher (:class:`~hf_kd.sparse_logits.SparseLogits`) is read as the dense logits it stands for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .capture import ModelView
from .row_loss import row_values, rows_from_views

METRICS = ("teacher_agreement", "kl_to_teacher")  # their names after the eval prefix (the student's metrics)


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]``: 1.0 where the student's top class equals the teacher's (``argmax s_r == argmax t_r``), else 0.0."""
    return (student.argmax(-1) == teacher.argmax(-1)).float()


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """``[n]``: ``KL(p_t || p_s) = sum_c p_t[c] (log p_t[c] - log p_s[c])`` at temperature 1, in fp32."""
    log_s = F.log_softmax(student.float(), dim=-1)
    log_t = F.log_softmax(teacher.float(), dim=-1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)


def agreement_per_sample(
    student: ModelView, teacher: ModelView, batch: Mapping[str, Any], chunk_size: int | None = None
) -> torch.Tensor:
    """``[B, 3]`` fp32 on the student's device: per sample of ``batch``, ``(sum agree_r, sum kl_r, rows)`` over its
    rows (one for a classifier, its predicted tokens for a causal LM).

    Per sample, so that evaluation can drop the repeated samples that pad the last batch across processes
    (``Accelerator.gather_for_metrics``) before adding up. ``chunk_size`` rows of logits at a time (default as
    :func:`~hf_kd.row_loss.rows_per_chunk`). No gradient.
    """
    rows = rows_from_views(student, teacher.detached(), batch)
    values = row_values([top1_agreement, kl_to_teacher], rows.student, rows.teacher, rows.rows, rows.vocab_size,
                        chunk_size)
    leading = rows.student.values.shape[:-1]  # [B] (a classifier) or [B, T] (a causal LM): rows index it flat
    samples = rows.rows // (leading[1] if len(leading) > 1 else 1)
    per_row = torch.cat([values, values.new_ones(len(values), 1)], dim=-1)
    return per_row.new_zeros(leading[0], 3).index_add_(0, samples, per_row)


def agreement_metrics(sums: torch.Tensor, prefix: str) -> dict[str, float]:
    """The metrics of ``(agree, kl, rows)`` summed over the evaluation set's samples:
    ``<prefix>_teacher_agreement`` and ``<prefix>_kl_to_teacher`` (none when no row was evaluated)."""
    agree, kl, count = sums.tolist()
    if not count:
        return {}
    return {f"{prefix}_{name}": value / count for name, value in zip(METRICS, (agree, kl))}

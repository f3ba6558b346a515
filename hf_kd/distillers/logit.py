"""Logit distillers: soft labels for classifiers (``[B, C]``) and token-level causal LMs (``[B, T, V]``).

Each distiller is a per-row divergence (one row = one sample, or one predicted token). For causal LMs the rows are
the shifted positions whose label is not -100, and the loss is normalised by the number of such tokens of the
optimizer step's global batch (:mod:`hf_kd.normalization`), so gradient accumulation and the number of processes
change nothing.

Temperature ``T`` softens both distributions: ``p = softmax(z / T)``, and every temperature-based divergence is
multiplied by ``T^2`` so its gradient keeps the same scale as ``T`` changes (Hinton et al., 2015).
``rectify=True`` (any of them) first corrects the teacher's wrong rows as DR-KD does
(:func:`~hf_kd.distillers.divergences.rectified`).
Use with a ``DistillationTrainer``, or call one on two ``ModelView``s yourself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..capture import ModelView, Requirements
from ..normalization import denominator
from ..row_loss import RowTerm, row_losses, rows_from_views
from ..schedules import Knob
from ..teacher_aggregation import TeacherAggregation
from . import divergences
from .base import Distiller, register_distiller


class LogitDistiller(Distiller):
    """A per-row loss on student and teacher logits.

    Subclasses implement ``divergence(student, teacher, targets)`` on temperature-scaled fp32 logits ``[n, C]``.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: Softmax temperature ``T`` (number or schedule); the divergence is multiplied by ``T^2``.
        teacher_aggregation: Read every teacher of ``teacher_model=[...]`` and match one target per row made from
            all of them: a policy name (``mean``, ``weighted``, ``confidence``, ``vote``, ``rank_fusion``, ``best``,
            ``learned``) or a dict ``{"policy": ..., **options}`` (:mod:`hf_kd.teacher_aggregation`). ``None``
            (default): the one teacher at the ``teacher`` option.
        rectify: DR-KD (Amik et al., https://huggingface.co/papers/2201.11319): in each row where the teacher's top
            class is not the true class (for causal LMs: the next token), swap the teacher's logits of the two
            before the divergence (:func:`~hf_kd.distillers.divergences.rectified`); rows the teacher gets right are
            unchanged. Works with any teacher, a self-teacher (:func:`hf_kd.make_self_teacher`) included, and needs
            labels in every batch.
    Inside a trainer all logit distillers share one chunked pass over the rows (``DistillationArguments.
    loss_chunk_size``); called on its own, a distiller uses ``chunk_size`` rows per chunk (default: sized from the
    vocabulary, see :func:`hf_kd.row_loss.rows_per_chunk`).
    """

    family = "logit"

    requires = Requirements(logits=True)
    # ``divergence`` reads a top-k teacher (SparseLogits) in O(k) per row: forward and reverse KL
    sparse_divergence: bool = False

    def __init__(self, weight: Knob = 1.0, temperature: Knob = 1.0,
                 teacher_aggregation: str | Mapping[str, Any] | None = None, rectify: bool = False) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        self.aggregation: nn.Module | None = None
        if teacher_aggregation is not None:
            self.aggregation = TeacherAggregation.from_option(teacher_aggregation)
            self.multi_teacher = True  # setup / the row pass receive every teacher
            if self.aggregation.needs_labels:
                self.requires = self.requires | Requirements(
                    labels=True, labels_for=f"teacher_aggregation {self.aggregation.policy!r} reads the true class")
        if not isinstance(rectify, bool):
            raise ValueError(f"{self.name}: `rectify` is true or false, got {rectify!r}.")
        self.rectify = rectify
        if rectify:
            self.requires = self.requires | Requirements(
                labels=True, labels_for="rectify=True swaps the teacher's logits of its top class and the true "
                "class; set rectify=False to distil without labels")

    def setup(self, student: nn.Module, teacher: nn.Module | Sequence[nn.Module] | None) -> None:
        if self.aggregation is not None:
            self.aggregation.setup(len(teacher))

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    @property
    def reads_sparse_teacher(self) -> bool:
        """A top-k cached teacher is read without making it dense: the divergence supports it, and no aggregation or
        rectification reshapes the teacher's logits first."""
        return self.sparse_divergence and self.aggregation is None and not self.rectify

    def row_loss(self, student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor],
                 targets: torch.Tensor | None) -> torch.Tensor:
        """Loss of each row from raw fp32 logits: ``T^2 * divergence(z_s / T, z_t / T)``; with several teachers
        ``z_t`` is their aggregation."""
        if self.aggregation is not None:
            teacher = self.aggregation(teacher, targets, self.temperature)
        return self.teacher_row_loss(student, self.teacher_logits(teacher, targets), targets)

    def teacher_logits(self, teacher: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The teacher's fp32 row logits as the divergence reads them: DR-KD-rectified with ``rectify=True``."""
        if not self.rectify:
            return teacher
        if targets is None:
            raise ValueError(f"{self.name}: rectify=True needs `labels` in the batch (the true class of each row).")
        return divergences.rectified(teacher, targets)

    def teacher_row_loss(self, student: torch.Tensor, teacher: torch.Tensor,
                         targets: torch.Tensor | None) -> torch.Tensor:
        """Loss of each row against the teacher logits (one teacher's, or the aggregation, rectified or not)."""
        return divergences.tempered(self.divergence, student, teacher, self.temperature, targets)

    def forward(
        self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any], chunk_size: int | None = None
    ) -> torch.Tensor:
        """The loss averaged over rows (samples, or valid tokens of a causal LM) of the step's global batch."""
        rows = rows_from_views(student, teacher, batch)
        total, _ = row_losses(
            [RowTerm(self.name, self.row_loss, 1.0, tuple(self.parameters()), self.reads_sparse_teacher)],
            rows.student,
            rows.teacher,
            rows.rows,
            rows.targets,
            rows.vocab_size,
            normalizer=denominator(batch, "rows", rows.rows.numel()),
            chunk_size=chunk_size,
        )
        return total

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}" + (", rectify=True" if self.rectify else "")


@register_distiller("kl")
class KLDistiller(LogitDistiller):
    """Forward KL ``T^2 * KL(p_t^T || p_s^T)`` — Hinton et al., "Distilling the Knowledge in a Neural Network",
    https://huggingface.co/papers/1503.02531."""

    sparse_divergence = True

    def divergence(self, student, teacher, targets):
        return divergences.forward_kl(student, teacher)


@register_distiller("reverse_kl")
class ReverseKLDistiller(LogitDistiller):
    """Reverse KL ``T^2 * KL(p_s^T || p_t^T)`` (mode-seeking; MiniLLM, Gu et al., ICLR 2024,
    https://huggingface.co/papers/2306.08543, token-level form)."""

    sparse_divergence = True

    def divergence(self, student, teacher, targets):
        return divergences.reverse_kl(student, teacher)


@register_distiller("jsd")
class JSDDistiller(LogitDistiller):
    """Generalized JSD of GKD (Agarwal et al., ICLR 2024, https://huggingface.co/papers/2306.13649):
    ``beta * KL(p_t || M) + (1 - beta) * KL(p_s || M)``.

    ``M = beta * p_t + (1 - beta) * p_s``; ``beta = 0`` is forward KL and ``beta = 1`` reverse KL (TRL convention).
    """

    def __init__(self, weight: Knob = 1.0, temperature: Knob = 1.0, beta: float = 0.5, **options: Any):
        super().__init__(weight, temperature, **options)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd: `beta` must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {beta}.")
        self.beta = beta

    def divergence(self, student, teacher, targets):
        return divergences.generalized_jsd(student, teacher, self.beta)


class _SkewDistiller(LogitDistiller):
    def __init__(self, weight: Knob = 1.0, temperature: Knob = 1.0, alpha: float = 0.1, **options: Any):
        super().__init__(weight, temperature, **options)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"{self.name}: `alpha` (skew) must lie in [0, 1), got {alpha}.")
        self.alpha = alpha


@register_distiller("skew_kl")
class SkewKLDistiller(_SkewDistiller):
    """Skew KL of DistiLLM (Ko et al., ICML 2024, https://huggingface.co/papers/2402.03898):
    ``KL(p_t || alpha * p_t + (1 - alpha) * p_s)``, alpha=0.1."""

    def divergence(self, student, teacher, targets):
        return divergences.skew_kl(student, teacher, self.alpha)


@register_distiller("skew_reverse_kl")
class SkewReverseKLDistiller(_SkewDistiller):
    """Skew reverse KL of DistiLLM: ``KL(p_s || (1 - alpha) * p_t + alpha * p_s)``, alpha=0.1."""

    def divergence(self, student, teacher, targets):
        return divergences.skew_reverse_kl(student, teacher, self.alpha)


@register_distiller("tvd")
class TVDDistiller(LogitDistiller):
    """Total variation distance ``T^2 * 0.5 * sum_c |p_t^T - p_s^T|``."""

    def divergence(self, student, teacher, targets):
        return divergences.total_variation(student, teacher)


@register_distiller("mse")
class LogitMSEDistiller(LogitDistiller):
    """Mean squared error between raw logits, ``mean_c (z_s - z_t)^2`` (no temperature; Ba & Caruana, 2014,
    https://huggingface.co/papers/1312.6184)."""

    def __init__(self, weight: Knob = 1.0, teacher_aggregation: str | Mapping[str, Any] | None = None,
                 rectify: bool = False) -> None:
        super().__init__(weight, 1.0, teacher_aggregation, rectify)

    def teacher_row_loss(self, student, teacher, targets):
        return divergences.logit_mse(student, teacher)


@register_distiller("dkd")
class DKDDistiller(LogitDistiller):
    """Decoupled KD (Zhao et al., CVPR 2022, https://huggingface.co/papers/2203.08679):
    ``min(step / warmup_steps, 1) * T^2 * (alpha*TCKD + beta*NCKD)``.

    Needs labels (the target class; for causal LMs the next token). mdistiller's CIFAR defaults: alpha=1, beta=8,
    T=4, warm-up of 20 epochs — here the warm-up is counted in optimizer steps (``warmup_steps=0``: none).
    The student's own cross-entropy is the trainer's ``hard_label_weight`` term.
    """

    requires = Requirements(logits=True, labels=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 4.0,
        alpha: float = 1.0,
        beta: float = 8.0,
        warmup_steps: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(weight, temperature, **options)
        if alpha < 0 or beta < 0 or warmup_steps < 0:
            raise ValueError(
                f"dkd: `alpha`, `beta` and `warmup_steps` must be >= 0, got {alpha}, {beta}, {warmup_steps}."
            )
        self.alpha, self.beta, self.warmup_steps = alpha, beta, warmup_steps

    def divergence(self, student, teacher, targets):
        if targets is None:
            raise ValueError("dkd needs `labels` in the batch (the target class of each row).")
        ramp = min(self.global_step / self.warmup_steps, 1.0) if self.warmup_steps else 1.0
        return ramp * divergences.decoupled_kd(student, teacher, targets, self.alpha, self.beta)

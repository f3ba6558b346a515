"""DGKD, densely guided KD with teacher assistants (Son et al., ICCV 2021, https://huggingface.co/papers/2009.08825;
code ``wonchulSon/DGKD``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..capture import ModelView, Requirements
from ..choices import check_choice
from ..row_loss import rows_from_views
from ..schedules import Knob
from ..step_random import StepRandom
from .base import Distiller, register_distiller
from .guides import kl_to_guide

Reduction = Literal["sum", "mean"]


@register_distiller("dgkd")
class DGKDDistiller(Distiller):
    """DGKD, densely guided KD (Son et al., ICCV 2021, https://huggingface.co/papers/2009.08825): the student learns
    from the teacher and every teacher assistant at once, all of them "guides"
    (``teacher_model=[teacher, assistant_1, ...]``; the order does not matter). Per row (sample, or predicted token
    of a causal LM)::

        L = T^2 * sum_{k in G \\ D} KL(p_k^T || p_s^T)        (reduction="sum", the paper's and the code's)
        L = T^2 * mean_{k in G \\ D} KL(p_k^T || p_s^T)       (reduction="mean")

    averaged over the rows of the optimizer step's global batch like every logit distiller; the student's own
    cross-entropy is the trainer's ``hard_label_weight`` term (the reference code trains with ``lambda = 1``, no CE:
    ``hard_label_weight=0``). ``D`` is the set of ``drop_num`` guides dropped this optimizer step (stochastic DGKD),
    drawn uniformly without replacement. It is a pure function of ``(seed, step)``
    (:meth:`~hf_kd.step_random.StepRandom.keyed`): every micro-batch and every process of a step drops the same
    guides, and a run resumed from a checkpoint drops what the uninterrupted run dropped (the reference code draws a
    new set per mini-batch, which is one optimizer step there). A dropped guide does not run that step
    (:meth:`teachers_read`), unless another distiller reads it. Evaluation drops nothing.

    ``drop_num`` must be below the number of guides (at least one guide stays), which :meth:`setup` checks before
    training: with a single teacher nothing can be dropped, so ``drop_num=0`` (and the loss is ``kl``'s). With
    ``drop_num > 0`` each step logs ``dropped_<k>`` per guide ``k`` (1 when dropped), so a logging window shows how
    often each guide was dropped.

    The paper trains the assistants themselves the same dense way beforehand, largest first:
    :func:`hf_kd.distill_chain` with ``guides="all"`` runs those stages.

    Logits of classifiers (``[B, C]``) and causal LMs (``[B, T, V]``), in one chunked row pass per kept guide. Views
    of the fused causal-LM path (the head's input and the head, no logits) work too, the logits formed chunk by
    chunk; inside :class:`~hf_kd.DistillationTrainer`, though, a distiller that reads logits outside the shared row
    pass turns that path off, so a causal-LM run holds every guide's ``[B, T, V]`` logits.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` (number or schedule); 5 as the reference code.
        drop_num: Guides dropped per optimizer step (the reference code's default 1).
        reduction: ``"sum"`` over the kept guides (the paper) or their ``"mean"`` (the scale of one ``kl`` whatever
            the number of guides).
        seed: Seed of the drops (``None``: ``TrainingArguments.seed``).
    """

    family = "logit"
    requires = Requirements(logits=True)
    multi_teacher = True

    def __init__(self, weight: Knob = 1.0, temperature: Knob = 5.0, drop_num: int = 1, reduction: Reduction = "sum",
                 seed: int | None = None) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if isinstance(drop_num, bool) or not isinstance(drop_num, int) or drop_num < 0:
            raise ValueError(f"dgkd: `drop_num` (guides dropped per step) must be an int >= 0, got {drop_num!r}.")
        self.drop_num = drop_num
        self.reduction = check_choice("dgkd", "reduction", reduction, Reduction)
        self.random = StepRandom(seed)

    def setup(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        self.check_guides(len(teachers))

    def check_guides(self, count: int) -> None:
        """At least one of ``count`` guides stays: ``drop_num < count``."""
        if self.drop_num >= count:
            raise ValueError(
                f"dgkd: `drop_num={self.drop_num}` must be below the number of guides, and `teacher_model` has "
                f"{count} teacher(s) (teacher and assistants). Set drop_num to at most {count - 1}, or pass more "
                "assistants: teacher_model=[teacher, assistant_1, ...]."
            )

    def dropped(self, count: int, step: int) -> list[int]:
        """The guides (positions in ``teacher_model``) dropped at optimizer step ``step``, of ``count``, sorted."""
        self.check_guides(count)
        if not self.drop_num:
            return []
        order = torch.randperm(count, generator=self.random.keyed(step, 0))
        return sorted(order[: self.drop_num].tolist())

    def teachers_read(self, count: int, training: bool) -> list[int]:
        """The guides kept this step: a dropped guide does not run."""
        dropped = self.dropped(count, self.global_step) if training else []
        return [k for k in range(count) if k not in dropped]

    def forward(self, student: ModelView, teachers: Sequence[ModelView | None], batch: Mapping[str, Any]):
        dropped = self.dropped(len(teachers), self.global_step) if student.model.training else []
        kept = [teacher for k, teacher in enumerate(teachers) if k not in dropped]
        total = sum(kl_to_guide(rows_from_views(student, teacher, batch), batch, self.temperature)
                    for teacher in kept)
        if self.reduction == "mean":
            total = total / len(kept)
        if not self.drop_num:
            return total, {}
        return total, {f"dropped_{k}": torch.tensor(float(k in dropped), device=total.device)
                       for k in range(len(teachers))}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, drop_num={self.drop_num}, "
                f"reduction={self.reduction!r}")

"""DualDE (Zhu et al., WSDM 2022, https://huggingface.co/papers/2009.05912), adapted from KG-embedding scores to any
classifier.

``dualde``: soft/hard weighting by the teacher's confidence, and a second stage where the teacher learns from the
student. Shared conventions of the online distillers (logits, logging, teacher-side parameters): see
``docs/distillers.md`` (online modules).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import Requirements
from ..schedules import Knob
from .base import Distiller, batch_labels, register_distiller, teacher_side_parameters
from .divergences import tempered_kl


@register_distiller("dualde")
class DualDEDistiller(Distiller):
    """DualDE (Zhu et al., WSDM 2022, https://huggingface.co/papers/2009.05912), adapted from KG-embedding triple scores
    to classifier logits.

    Stage 1 (optimizer steps ``< stage2_step``, teacher frozen)::

        w(x)  = sigmoid(beta * (p_t(y|x) - c))                 teacher's confidence on the true label, detached
        L_S   = mean_x [ w(x) * T^2 KL(p_t^T || p_s^T) + (1 - w(x)) * CE(y, p_s) ]

    Stage 2 (from optimizer step ``stage2_step``): the teacher (all parameters, or ``teacher_modules``) also learns
    from the student with the symmetric loss, weighted by the student's confidence::

        v(x)  = sigmoid(beta * (p_s(y|x) - c))                 detached
        L_T   = mean_x [ v(x) * T^2 KL(p_s^T || p_t^T) + (1 - v(x)) * CE(y, p_t) ]   (student logits detached)

    The stage is set in ``set_progress`` from the trainer's ``global_step`` (set as each step begins), so a run
    resumed from a checkpoint switches at the same step. The teacher-side parameters are declared from the start
    (the optimizer is built once), but in stage 1 the teacher's logits are detached: they get no gradient and the
    optimizer leaves them bitwise unchanged. ``stage2_step=None``: stage 1 only (the teacher stays frozen and runs
    without autograd).

    The hard cross-entropy is inside this loss, so set ``hard_label_weight=0`` unless you want extra CE on top.
    Logged sub-terms: ``soft``, ``hard``, ``w`` (mean teacher weight), ``student`` and, in stage 2, ``teacher``.

    **Unverified / adapted:** the method is known here only from the paper's abstract. The sigmoid form of the
    weight, the confidences at temperature 1, and KL in place of the paper's Huber losses on triple scores and
    embedding structure are this library's adaptation to classifiers; the paper's structure term (head/tail
    embedding norms and angles) is not implemented.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` of the soft term (number or schedule).
        beta: Sharpness of the confidence weighting.
        c: Confidence at which soft and hard terms weigh the same.
        stage2_step: Optimizer step at which stage 2 begins; ``None``: never.
        teacher_modules: Teacher submodules trained in stage 2 (e.g. ``["classifier"]``); ``None``: the whole teacher.
    """

    family = "online"

    requires = Requirements(logits=True, labels=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        beta: float = 10.0,
        c: float = 0.5,
        stage2_step: int | None = None,
        teacher_modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if beta < 0:
            raise ValueError(f"dualde: `beta` must be >= 0, got {beta}.")
        if stage2_step is not None and stage2_step < 0:
            raise ValueError(f"dualde: `stage2_step` must be a step number >= 0 (or None), got {stage2_step}.")
        if teacher_modules is not None and stage2_step is None:
            raise ValueError("dualde: `teacher_modules` only applies with a `stage2_step`.")
        self.beta, self.c = float(beta), float(c)
        self.stage2_step = stage2_step
        self.teacher_modules = teacher_modules
        self._teacher_params: list[nn.Parameter] = []

    @property
    def stage(self) -> int:
        return 2 if self.stage2_step is not None and self.global_step >= self.stage2_step else 1

    def setup(self, student, teacher):
        if self.stage2_step is not None:
            self._teacher_params = teacher_side_parameters(teacher, self.teacher_modules, "dualde")

    def teacher_parameters(self):
        return list(self._teacher_params)

    def confidence_weight(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sigmoid(beta * (p(y|x) - c))`` per sample, detached."""
        with torch.no_grad():
            p_y = logits.detach().float().softmax(-1).gather(-1, labels.view(-1, 1)).squeeze(-1)
            return torch.sigmoid(self.beta * (p_y - self.c))

    def _mixed(self, learner: torch.Tensor, guide: torch.Tensor, labels: torch.Tensor, w: torch.Tensor):
        soft = tempered_kl(learner, guide.detach(), self.temperature)
        hard = F.cross_entropy(learner, labels, reduction="none")
        return (w * soft + (1.0 - w) * hard).mean(), soft.mean(), hard.mean()

    def forward(self, student, teacher, batch):
        z_s = student.class_logits("student", "dualde")
        z_t = teacher.class_logits("teacher", "dualde")
        labels = batch_labels(batch, "dualde")
        w = self.confidence_weight(z_t, labels)
        student_loss, soft, hard = self._mixed(z_s, z_t, labels, w)
        parts = {"student": student_loss.detach(), "soft": soft.detach(), "hard": hard.detach(), "w": w.mean()}
        if self.stage == 1:
            return student_loss, parts
        teacher_loss, _, _ = self._mixed(z_t, z_s, labels, self.confidence_weight(z_s, labels))
        parts["teacher"] = teacher_loss.detach()
        return student_loss + teacher_loss, parts

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, beta={self.beta}, c={self.c}, "
                f"stage2_step={self.stage2_step}")

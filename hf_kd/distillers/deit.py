"""DeiT's distillation-token loss — Touvron et al., "Training data-efficient image transformers & distillation
through attention" (ICML 2021, https://huggingface.co/papers/2012.12877; code: ``facebookresearch/deit`` ``losses.py``).

The student is a ViT with a second learnable token beside the class token, each with its own linear head
(``transformers.DeiTForImageClassificationWithTeacher``: ``cls_classifier`` and ``distillation_classifier``). The
class head learns the labels, the distillation head learns the teacher:

- ``hard``: ``(1 - alpha) * CE(z_cls, y) + alpha * CE(z_dist, argmax z_t)`` (``alpha = 0.5``: the paper's ½ / ½);
- ``soft``: ``(1 - alpha) * CE(z_cls, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_dist / tau))``.

At inference the model's ``logits`` are the mean of the two heads' logits (as in DeiT's ``models.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import find_module
from ..capture import FeatureSpec, ModelView, Requirements
from ..choices import check_choice
from ..schedules import Knob
from . import divergences
from .base import Distiller, register_distiller

DistillationType = Literal["hard", "soft"]


@register_distiller("deit")
class DeiTDistiller(Distiller):
    """DeiT distillation through a distillation token: CE on the class head + a teacher term on the distillation head
    (Touvron et al., ICML 2021, https://huggingface.co/papers/2012.12877).

    The class-head cross-entropy is part of this loss, so train with ``hard_label_weight=0`` (the student's own
    ``logits`` average both heads and must not get a CE of their own). The heads' outputs are read with forward
    hooks on ``cls_head`` and ``distillation_head``.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        distillation_type: ``"hard"`` (CE to the teacher's argmax) or ``"soft"`` (``tau^2``-scaled KL).
        alpha: Share of the teacher term; ``1 - alpha`` goes to the class head's CE (DeiT code default 0.5).
        temperature: ``tau`` of the soft type (DeiT code default 1; the paper's soft runs use 3 with alpha 0.1).
            Unlike DeiT's code, which divides the summed KL by ``batch * classes``, the KL is averaged over the
            batch only (``batchmean``), i.e. ``classes`` times larger than DeiT's for the same ``alpha``.
        cls_head: Dotted name of the student's class-token head.
        distillation_head: Dotted name of the student's distillation-token head.
    """

    family = "logit"

    requires = Requirements(logits=True, labels=True)  # the teacher's logits; the student's heads via hooks

    def __init__(
        self,
        weight: Knob = 1.0,
        distillation_type: DistillationType = "hard",
        alpha: Knob = 0.5,
        temperature: Knob = 1.0,
        cls_head: str = "cls_classifier",
        distillation_head: str = "distillation_classifier",
    ) -> None:
        super().__init__(weight)
        self.distillation_type = check_choice("deit", "distillation_type", distillation_type, DistillationType)
        self.alpha = self.schedulable("alpha", alpha, maximum=1.0)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        self.cls_spec = FeatureSpec(cls_head, "output")
        self.distillation_spec = FeatureSpec(distillation_head, "output")

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Check that the student has both heads (the trainer checks that they predict the teacher's classes)."""
        if teacher is None:
            raise ValueError("deit needs a teacher: pass `teacher_model` to the DistillationTrainer.")
        for option, spec in (("cls_head", self.cls_spec), ("distillation_head", self.distillation_spec)):
            try:
                find_module(student, spec.path)
            except ValueError as error:
                raise ValueError(
                    f"deit: {error} The student needs a class head and a distillation head, e.g. "
                    "transformers.DeiTForImageClassificationWithTeacher (set `deit: hard|soft` in the "
                    f"vit_image_classification recipe), or set `{option}` to the module's name."
                ) from None

    def student_features(self):
        return (self.cls_spec, self.distillation_spec)

    def forward(
        self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(1 - alpha) * CE(z_cls, y) + alpha * teacher_term``; logs both terms as ``cls`` and ``distillation``."""
        cls_logits = student.features[self.cls_spec].float()
        distillation_logits = student.features[self.distillation_spec].float()
        teacher_logits = teacher.logits.float()
        cls_loss = F.cross_entropy(cls_logits, batch["labels"])
        if self.distillation_type == "hard":
            distillation_loss = F.cross_entropy(distillation_logits, teacher_logits.argmax(-1))
        else:
            distillation_loss = divergences.tempered_kl(distillation_logits, teacher_logits, self.temperature).mean()
        loss = (1 - self.alpha) * cls_loss + self.alpha * distillation_loss
        return loss, {"cls": cls_loss.detach(), "distillation": distillation_loss.detach()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, distillation_type={self.distillation_type!r}, alpha={self.alpha}, "
                f"temperature={self.temperature}")

"""``virtual_teacher``: Tf-KD's hand-made teacher, no teacher model needed (Yuan et al., CVPR 2020, "Revisiting
Knowledge Distillation via Label Smoothing Regularization", https://huggingface.co/papers/1909.11723, Tf-KD_reg).

The virtual teacher of a row with true class ``y`` (for causal LMs: the next token) over ``C`` classes is

    p^d(c) = a                  for c = y
    p^d(c) = (1 - a) / (C - 1)  otherwise

with ``a = correct_prob``: a teacher that is always right, with a flat distribution over the other classes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..capture import Requirements
from ..choices import check_choice
from ..schedules import Knob
from . import divergences
from .base import register_distiller
from .logit import LogitDistiller

Form = Literal["tempered", "reference"]


@register_distiller("virtual_teacher")
class VirtualTeacherDistiller(LogitDistiller):
    """Tf-KD_reg: the student matched by KL to the virtual teacher ``p^d`` (module doc), on every row.

    ``form="tempered"`` (default): the virtual teacher's logits are ``log p^d``, softened like any teacher's,
    ``p^d_T = softmax(log p^d / T)`` (``∝ (p^d)^(1/T)``; ``p^d`` itself at ``T = 1``), and the loss is
    ``T^2 * KL(p^d_T || softmax(z_s / T))``, the convention of every logit distiller here.

    ``form="reference"``: the loss of the authors' code (``loss_kd_regularization``), ``KL(softmax(p^d / T) ||
    softmax(z_s))``: the probabilities ``p^d`` are fed to the softmax as logits at ``T``, the student is not
    softened, and there is no ``T^2``. That teacher is close to uniform at any ``T >= 1`` (at ``C = 100``,
    ``a = 0.9``, ``T = 1`` it gives the true class 0.024). The code reduces with ``nn.KLDivLoss()``, a mean over all
    ``n * C`` entries, times its ``multiplier``; here the KL is averaged over rows, so ``weight = multiplier / C``
    reproduces it.

    Needs labels and no teacher; the student's own cross-entropy is the trainer's ``hard_label_weight`` term (the
    paper's ``(1 - alpha) CE + alpha KL`` is ``hard_label_weight = 1 - alpha``, ``weight = alpha``). The paper
    does not say how ``p^d`` is softened; ``"tempered"`` is its formula read with the convention of every teacher
    here. Copies of the authors' code set ``T`` = 20 to 40 for CIFAR-100 models.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` (number or schedule).
        correct_prob: ``a``, the virtual teacher's probability of the true class, in ``(0, 1]`` (0.9 as in the
            authors' code; other versions of it use 0.99).
        form: ``"tempered"`` or ``"reference"`` (above).
    """

    requires = Requirements(logits=True, labels=True, teacher=False)

    def __init__(
        self, weight: Knob = 1.0, temperature: Knob = 1.0, correct_prob: float = 0.9, form: Form = "tempered"
    ) -> None:
        super().__init__(weight, temperature)
        if not 0.0 < correct_prob <= 1.0:
            raise ValueError(f"virtual_teacher: `correct_prob` must lie in (0, 1], got {correct_prob}.")
        self.correct_prob = float(correct_prob)
        self.form = check_choice("virtual_teacher", "form", form, Form)

    def virtual_log_probs(self, targets: torch.Tensor, classes: int, like: torch.Tensor) -> torch.Tensor:
        """``log p^d``, ``[n, classes]`` in the dtype and device of ``like``."""
        if classes < 2:
            raise ValueError(f"virtual_teacher needs at least 2 classes, the student has {classes}.")
        rest = (1.0 - self.correct_prob) / (classes - 1)
        log_rest = math.log(rest) if rest > 0 else float("-inf")
        log_probs = like.new_full((targets.numel(), classes), log_rest)
        return log_probs.scatter_(-1, targets.unsqueeze(-1), math.log(self.correct_prob))

    def row_loss(self, student, teacher, targets):
        if targets is None:
            raise ValueError("virtual_teacher needs `labels` in the batch (the true class of each row).")
        log_virtual = self.virtual_log_probs(targets, student.shape[-1], student)
        if self.form == "tempered":
            return divergences.tempered(divergences.forward_kl, student, log_virtual, self.temperature)
        return divergences.forward_kl(student, log_virtual.exp() / self.temperature)

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, correct_prob={self.correct_prob}, "
                f"form={self.form!r}")

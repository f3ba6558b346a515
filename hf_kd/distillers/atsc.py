"""ATSC: adaptive teaching with a shared classifier (arXiv 2406.08528; code ``random2314235/ATSC``; ``methods.md`` B1).

SimKD-style: the student predicts through the *teacher's* classifier, reached through a projector ``P: d_s -> d_t``
applied to the student's pooled feature. Unlike SimKD the teacher keeps adapting toward the student, under an L2
anchor that keeps its weights near their pretrained values.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import FeatureSpec, ModelView, Requirements, find_module
from ..schedules import Schedule
from .base import Distiller, register_distiller

Knob = float | Schedule | Mapping[str, Any]
_ADAPTATIONS = ("full", "none")


@register_distiller("atsc")
class ATSCDistiller(Distiller):
    """ATSC, adaptive teaching with a shared classifier (Li et al., arXiv 2406.08528), for classifiers whose head is a
    ``Linear`` named ``classifier`` (BERT-family ``*ForSequenceClassification``, ``ViTForImageClassification``).

    With ``f_s`` / ``f_t`` the inputs of the student's / teacher's classifier (pooled features) and ``W_t, b_t`` the
    teacher's classifier, the student predicts through the shared (teacher's) classifier::

        z = W_t P(f_s) + b_t                 P: Linear(d_s -> d_t), a parameter of this distiller

    and this distiller's loss is::

        L = feature_weight * MSE(P(f_s), f_t) + anchor_weight * sum_{W in teacher, W.dim() > 1} ||W - W0||^2

    **The hard loss is the trainer's.** During every ``compute_loss`` (training and evaluation with labels) a forward
    hook on the student's classifier replaces its output with ``z``, so the student's logits *are* the
    shared-classifier logits, and the trainer's ``hard_label_weight * CE(y, student logits)`` is ``CE(y, z)``. It
    trains ``P``, the student and (with ``teacher_adaptation="full"``) the teacher's classifier. The official
    README flags ``-c 0 -d 0 -b 1 -w 1`` set CE and KD on the student's *own* head, which ATSC never uses for its
    prediction; so ``feature_weight=1`` and ``anchor_weight=1`` here are ``-b 1 -w 1``, and ``hard_label_weight=0``
    reproduces the official ``-c 0`` (no CE on the prediction path at all).

    **Folding.** After :meth:`setup` and after every optimizer step (:meth:`on_step_end`) the shared path is folded
    exactly into the student's own classifier (``W_s <- W_t W_P``, ``b_s <- W_t b_P + b_t``), so the plain student
    (``save_model``, ``from_pretrained``, ``predict`` without labels) gives the shared-classifier logits; no extra
    module is needed at inference. This needs the teacher's number of classes equal to the student's ``num_labels``.
    Note that :meth:`setup` overwrites the student's classifier weights in place.

    **Teacher adaptation.** ``"full"`` (default, as the official code): every teacher parameter is trained
    (``teacher_parameters()``; ``DistillationArguments.teacher_learning_rate``), the teacher runs in train mode, the
    MSE is *not* detached on the teacher side (it also pulls ``f_t`` toward ``P(f_s)``), and the anchor is on every
    teacher parameter with ``dim() > 1`` (so biases and LayerNorm are free; the classifier weight is anchored).
    ``W0`` are frozen copies held as buffers of this distiller: **memory (and, as they are saved in
    ``distillers.pt``, checkpoint size) grows by about one teacher.** ``"none"``: the teacher stays frozen (SimKD with
    a linear projector); the anchor is 0 and no copies are kept.

    **Not implemented (open).** ``teacher_adaptation="lora"`` (raises), multi-teacher ATSC (the trainer has one
    teacher), the official second step (CE on the teacher's logits, stepping only the teacher's FC bias), and the
    official conv bottleneck projector (pooled transformer features use a ``Linear``).

    Args:
        weight: Factor of the whole loss (number or schedule).
        feature_weight: Factor of the feature MSE (official ``-b``).
        anchor_weight: Factor of the L2 anchor (official ``-w``).
        teacher_adaptation: ``"full"`` or ``"none"``.
        head_module: Dotted name of the classifier ``Linear`` in both models.

    Logged sub-terms: ``mse`` and ``anchor`` (unweighted).
    """

    requires = Requirements()

    def __init__(
        self,
        weight: Knob = 1.0,
        feature_weight: Knob = 1.0,
        anchor_weight: Knob = 1.0,
        teacher_adaptation: Literal["full", "none"] = "full",
        head_module: str = "classifier",
    ) -> None:
        super().__init__(weight)
        self.feature_weight = self.schedulable("feature_weight", feature_weight)
        self.anchor_weight = self.schedulable("anchor_weight", anchor_weight)
        if teacher_adaptation == "lora":
            raise ValueError(
                "atsc: teacher_adaptation='lora' is not implemented yet; use 'full' (all teacher parameters adapt, "
                "with the L2 anchor) or 'none' (frozen teacher)."
            )
        if teacher_adaptation not in _ADAPTATIONS:
            raise ValueError(f"atsc: `teacher_adaptation` must be one of {_ADAPTATIONS}, got {teacher_adaptation!r}.")
        if not isinstance(head_module, str) or not head_module:
            raise ValueError(f"atsc: `head_module` must be a dotted module name, got {head_module!r}.")
        self.teacher_adaptation = teacher_adaptation
        self.head_module = head_module
        self.teacher_train_mode = teacher_adaptation == "full"
        self.projector: nn.Linear | None = None
        # Plain lists: the models' modules and parameters are not distiller state.
        self._heads: list[nn.Linear] = []  # [student head, teacher head]
        self._teacher_params: list[nn.Parameter] = []
        self._anchored: list[tuple[nn.Parameter, str]] = []  # (teacher parameter, name of its W0 buffer)

    # ---- setup --------------------------------------------------------------------------------------------------
    def _head(self, model: nn.Module, role: str) -> nn.Linear:
        head = find_module(model, self.head_module)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"atsc: the {role}'s `{self.head_module}` is {type(head).__name__}, not nn.Linear. ATSC shares a "
                "linear classifier (BERT-family *ForSequenceClassification, ViTForImageClassification); set "
                "`head_module` to the dotted name of the linear classifier."
            )
        return head

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("atsc predicts through the teacher's classifier, so it needs `teacher_model=`.")
        s_head, t_head = self._head(student, "student"), self._head(teacher, "teacher")
        if s_head.out_features != t_head.out_features:
            raise ValueError(
                f"atsc folds the shared classifier into the student's, so both need the same number of classes: the "
                f"teacher's `{self.head_module}` has {t_head.out_features} outputs, the student's "
                f"{s_head.out_features}. Load the student with num_labels={t_head.out_features}."
            )
        if (s_head.bias is None) != (t_head.bias is None):
            raise ValueError("atsc: the student's and the teacher's classifiers must both have a bias or both not.")
        self._heads = [s_head, t_head]
        self.projector = nn.Linear(s_head.in_features, t_head.in_features).to(s_head.weight.device)
        self._anchored = []
        if self.teacher_adaptation == "full":
            self._teacher_params = list(teacher.parameters())
            for index, (name, param) in enumerate(teacher.named_parameters()):
                if param.dim() > 1:
                    buffer = f"anchor_{index}_" + name.replace(".", "_")
                    self.register_buffer(buffer, param.detach().clone())
                    self._anchored.append((param, buffer))
        else:
            self._teacher_params = []
        self.fold()

    def teacher_parameters(self):
        return list(self._teacher_params)

    def student_features(self):
        return (FeatureSpec(self.head_module, "input"),)

    def teacher_features(self):
        return (FeatureSpec(self.head_module, "input"),)

    # ---- the shared classifier --------------------------------------------------------------------------------
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``P(f_s)``."""
        return self.projector(features.to(self.projector.weight.dtype))

    def shared_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``W_t P(f_s) + b_t`` (with autograd into ``P``, the student and the teacher's head)."""
        head = self._heads[1]
        projected = self.project(features)
        return F.linear(projected.to(head.weight.dtype), head.weight, head.bias)

    @contextlib.contextmanager
    def _shared_head(self, student: nn.Module) -> Iterator[None]:
        head = self._heads[0]

        def replace_output(module, args, output):
            return self.shared_logits(args[0]).to(output.dtype)

        handle = head.register_forward_hook(replace_output)
        try:
            yield
        finally:
            handle.remove()

    def student_forward_context(self, student: nn.Module, training: bool):
        # Training and evaluation alike: the student's logits are the shared-classifier logits.
        return self._shared_head(student)

    @torch.no_grad()
    def fold(self) -> None:
        """Write the shared path into the student's classifier: ``W_s = W_t W_P``, ``b_s = W_t b_P + b_t``."""
        s_head, t_head = self._heads
        device = s_head.weight.device
        w_t = t_head.weight.detach().to(device, torch.float32)
        w_p = self.projector.weight.detach().to(device, torch.float32)
        b_p = self.projector.bias.detach().to(device, torch.float32)
        s_head.weight.copy_(w_t @ w_p)
        if s_head.bias is not None:
            s_head.bias.copy_(w_t @ b_p + t_head.bias.detach().to(device, torch.float32))

    def on_step_end(self) -> None:
        self.fold()

    # ---- the loss -----------------------------------------------------------------------------------------------
    def anchor(self) -> torch.Tensor:
        """``sum_{W in teacher, W.dim() > 1} ||W - W0||^2`` (0 with ``teacher_adaptation="none"``)."""
        total = torch.zeros((), device=self.projector.weight.device)
        for param, buffer in self._anchored:
            total = total + (param.float() - getattr(self, buffer).float()).pow(2).sum().to(total.device)
        return total

    def forward(self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any]):
        spec = FeatureSpec(self.head_module, "input")
        f_s, f_t = student.features[spec], teacher.features[spec]
        projected = self.project(f_s)
        mse = F.mse_loss(projected.float(), f_t.float())  # f_t not detached: the teacher adapts toward P(f_s)
        anchor = self.anchor()
        loss = self.feature_weight * mse + self.anchor_weight * anchor
        return loss, {"mse": mse.detach(), "anchor": anchor.detach()}

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, feature_weight={self.feature_weight}, anchor_weight={self.anchor_weight}, "
            f"teacher_adaptation={self.teacher_adaptation!r}, head_module={self.head_module!r}"
        )

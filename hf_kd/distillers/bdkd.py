"""BD-KD, "balancing divergences" for online KD (Amara et al., https://huggingface.co/papers/2212.12965).

``bdkd``: a per-sample balance of forward and reverse KL for the student; optionally the teacher learns too
(``online_teacher=True``). The balance ``w_r`` comes from a named weighting (:func:`register_bdkd_weighting` adds
one). Shared conventions of the online distillers (logits, logging, teacher-side parameters): see
``docs/distillers.md`` (online modules).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import Requirements
from ..schedules import Knob
from .base import Distiller, batch_labels, register_distiller, teacher_side_parameters
from .divergences import forward_kl, reverse_kl, tempered

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_WEIGHTINGS: dict[str, Weighting] = {}


def register_bdkd_weighting(name: str):
    """Decorator: make ``fn(student_logits, teacher_logits) -> w_r`` (``[B]`` in ``[0, 1]``) usable as
    ``bdkd``'s ``weighting=name``. ``w_r`` weights the reverse KL, ``1 - w_r`` the forward KL."""

    def decorate(fn: Weighting) -> Weighting:
        _WEIGHTINGS[name] = fn
        return fn

    return decorate


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


@register_bdkd_weighting("entropy")
def entropy_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``w_r = H(p_s) / (H(p_s) + H(p_t))`` on the untempered distributions (placeholder form, unverified)."""
    h_s, h_t = _entropy(student), _entropy(teacher)
    return h_s / (h_s + h_t).clamp_min(1e-12)


@register_bdkd_weighting("forward")
def forward_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL only (``w_r = 0``): plain KD, for ablations."""
    return student.new_zeros(student.shape[0])


@register_bdkd_weighting("reverse")
def reverse_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reverse KL only (``w_r = 1``), for ablations."""
    return student.new_ones(student.shape[0])


@register_bdkd_weighting("balanced")
def balanced_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Fixed ``w_r = w_f = 0.5``, for ablations."""
    return student.new_full((student.shape[0],), 0.5)


@register_distiller("bdkd")
class BDKDDistiller(Distiller):
    """BD-KD, "balancing divergences" for online KD (Amara et al., https://huggingface.co/papers/2212.12965).

    Student::

        L_S = T^2 * mean_x [ w_f(x) KL(p_t^T || p_s^T) + w_r(x) KL(p_s^T || p_t^T) ]     (+ CE: hard_label_weight)

    with ``w_r = weighting(z_s, z_t)`` detached and ``w_f = 1 - w_r``. With ``online_teacher=True`` the teacher (all
    its parameters, or those of ``teacher_modules``) learns at the same time with the v1 teacher loss::

        L_T = CE(y, p_t) + T^2 * mean_x KL(p_s^T || p_t^T)          (student logits detached)

    and runs in train mode (dropout) during training. The returned loss is ``L_S (+ L_T)``; both are logged as
    ``student`` / ``teacher`` sub-terms, with the two KLs and the mean ``w_r``.

    **Unverified:** the paper's exact form of ``w_f, w_r`` (only the abstract was available). The default
    ``weighting="entropy"``, ``w_r = H(p_s) / (H(p_s) + H(p_t))`` at temperature 1, is a placeholder (a sound
    form, not the paper's) — the less certain the student is relative to the teacher, the more reverse (mode-seeking)
    KL. Other names: ``"forward"``, ``"reverse"``, ``"balanced"``; or pass a callable
    ``fn(student_logits, teacher_logits) -> w_r [B]`` (or register one with :func:`register_bdkd_weighting`).
    The v2 variant (mirrored balance in the teacher loss) is not implemented.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` (number or schedule).
        weighting: Name of a registered weighting, or a callable.
        online_teacher: Train the teacher too (needs ``labels``).
        teacher_modules: With ``online_teacher``: dotted names of the teacher submodules to train (e.g.
            ``["classifier"]``); ``None``: all of the teacher.
    """

    family = "online"

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        weighting: str | Weighting = "entropy",
        online_teacher: bool = False,
        teacher_modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if isinstance(weighting, str):
            if weighting not in _WEIGHTINGS:
                valid = ", ".join(sorted(_WEIGHTINGS))
                raise ValueError(f"bdkd: unknown `weighting` {weighting!r}. Valid names: {valid}.")
            self.weighting_fn = _WEIGHTINGS[weighting]
        elif callable(weighting):
            self.weighting_fn = weighting
        else:
            raise ValueError(f"bdkd: `weighting` must be a name or a callable, got {weighting!r}.")
        if teacher_modules is not None and not online_teacher:
            raise ValueError("bdkd: `teacher_modules` only applies with `online_teacher=True`.")
        self.online_teacher = bool(online_teacher)
        self.teacher_modules = teacher_modules
        self.requires = Requirements(logits=True, labels=self.online_teacher)
        self.teacher_train_mode = self.online_teacher
        self._teacher_params: list[nn.Parameter] = []  # a plain list: teacher weights are not distiller state

    def setup(self, student, teacher):
        if self.online_teacher:
            self._teacher_params = teacher_side_parameters(teacher, self.teacher_modules, "bdkd")

    def teacher_parameters(self):
        return list(self._teacher_params)

    def reverse_weight(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``w_r`` per sample (detached, clamped to ``[0, 1]``)."""
        with torch.no_grad():
            return self.weighting_fn(student_logits.detach(), teacher_logits.detach()).float().clamp(0.0, 1.0)

    def forward(self, student, teacher, batch):
        z_s = student.class_logits("student", "bdkd")
        z_t = teacher.class_logits("teacher", "bdkd")
        t = self.temperature
        w_r = self.reverse_weight(z_s, z_t)
        z_t_fixed = z_t.detach()
        fwd = tempered(forward_kl, z_s, z_t_fixed, t)
        rev = tempered(reverse_kl, z_s, z_t_fixed, t)
        student_loss = ((1.0 - w_r) * fwd + w_r * rev).mean()
        parts = {
            "student": student_loss.detach(),
            "forward_kl": fwd.mean().detach(),
            "reverse_kl": rev.mean().detach(),
            "w_reverse": w_r.mean(),
        }
        loss = student_loss
        if self.online_teacher:
            labels = batch_labels(batch, "bdkd with online_teacher=True")
            teacher_loss = F.cross_entropy(z_t, labels) + tempered(reverse_kl, z_s.detach(), z_t, t).mean()
            parts["teacher"] = teacher_loss.detach()
            loss = loss + teacher_loss
        return loss, parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, online_teacher={self.online_teacher}"

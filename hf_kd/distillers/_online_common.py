"""Helpers shared by the online distillers (``bdkd``, ``dualde``, ``mutual``, ``p2p``).

These methods have something besides the student learn during distillation. They all work on classifier logits
``[B, C]``. Every loss is returned as one scalar (the student's, peers' and teacher's terms summed, so the
distiller's ``weight`` scales all of them), with each side logged as a sub-term (``loss/<name>/student``,
``loss/<name>/teacher``, ``loss/<name>/peer_0``, ...). Reductions are per sample (``batchmean``); temperature-scaled
KLs are multiplied by ``T^2``. The student's own cross-entropy is the trainer's ``hard_label_weight`` term, except for
``dualde``, which holds its hard term itself.

Teacher-side parameters are declared with ``teacher_parameters()`` (the trainer unfreezes them, trains them with
``DistillationArguments.teacher_learning_rate`` and checkpoints them); :func:`_teacher_side_parameters` picks them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..capture import ModelView
from .divergences import forward_kl


def _class_logits(view: ModelView, role: str, method: str) -> torch.Tensor:
    logits = view.logits
    if logits is None or logits.dim() != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(
            f"{method} works on classifier logits [batch, classes]; the {role} gave logits of shape {shape}. Use it "
            "with sequence/image classification models."
        )
    return logits.float()


def _labels(batch: Mapping[str, Any], method: str) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"{method} needs `labels` (one class index per sample) in every batch.")
    return labels


def _kl_t(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` per row (the caller detaches whichever side must not learn)."""
    return forward_kl(student / temperature, teacher / temperature) * temperature**2


def _teacher_side_parameters(teacher: nn.Module | None, modules: Sequence[str] | None, method: str) -> list:
    if teacher is None:
        raise ValueError(f"{method} trains teacher-side parameters, so it needs `teacher_model=`.")
    if modules is None:
        return list(teacher.parameters())
    if isinstance(modules, str):
        modules = [modules]
    params = []
    for name in modules:
        try:
            params.extend(teacher.get_submodule(name).parameters())
        except AttributeError:
            names = [n for n, _ in teacher.named_children()]
            raise ValueError(
                f"{method}: the teacher has no submodule {name!r} (`teacher_modules`). Its top-level modules: {names}; "
                "use dotted names from teacher.named_modules()."
            ) from None
    if not params:
        raise ValueError(f"{method}: `teacher_modules={list(modules)}` hold no parameters.")
    return params

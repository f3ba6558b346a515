"""Teacher preparation and the checks that a teacher/student pair can be distilled.

A teacher is frozen (``eval()``, ``requires_grad=False``), cast to the requested dtype and placed through
Accelerate with ``prepare_model(..., evaluation_mode=True)``: it is never wrapped for training, never in the
optimizer and never part of the saved student.
"""

from __future__ import annotations

import logging

import torch
from accelerate import Accelerator
from torch import nn

from .capture import logits_width, task_of

logger = logging.getLogger(__name__)


def prepare_teacher(teacher: nn.Module, accelerator: Accelerator, dtype: torch.dtype | None) -> nn.Module:
    """Freeze ``teacher``, cast it to ``dtype`` (if given) and place it on the training device(s)."""
    if dtype is not None:
        teacher = teacher.to(dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def shared_logit_width(student: nn.Module, teacher: nn.Module, tokenizer=None) -> int:
    """The number of logits both models are compared on; raises when the pair cannot be compared.

    Classifiers need the same task and number of labels. Causal LMs need the same vocabulary; when one head is a
    padded copy of the other (same tokenizer, rows rounded up for speed: e.g. 151936 vs 152064), the common prefix
    is used. Padding is recognised when the tokenizer fits inside the smaller vocabulary or, without a tokenizer,
    when the sizes differ by at most 1%.
    """
    s_task, t_task = task_of(student), task_of(teacher)
    names = f"student {type(student).__name__} and teacher {type(teacher).__name__}"
    if s_task != t_task:
        raise ValueError(
            f"The {names} solve different tasks ({s_task} vs {t_task}); logit distillation compares the same "
            f"outputs. Load both with the same AutoModelFor* class."
        )
    if s_task == "other":
        raise ValueError(
            f"Logit distillation needs models with a classification or causal-LM head; {names} have none. "
            f"Load them with AutoModelForSequenceClassification, AutoModelForImageClassification or "
            f"AutoModelForCausalLM."
        )
    s_width, t_width = logits_width(student), logits_width(teacher)
    if s_width == t_width:
        return s_width
    if s_task == "classification":
        raise ValueError(
            f"The student has num_labels={s_width} but the teacher has num_labels={t_width}. Build the student with "
            f"num_labels={t_width} (and the teacher's id2label) so that logits line up."
        )
    small, large = sorted((s_width, t_width))
    tokenizer_size = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    padded = tokenizer_size <= small if tokenizer_size is not None else (large - small) <= 0.01 * large
    if not padded:
        raise ValueError(
            f"Student vocabulary size {s_width} and teacher vocabulary size {t_width} differ and neither is a "
            f"padded copy of the other (tokenizer size: {tokenizer_size}). Token-level distillation needs a shared "
            f"tokenizer: build the student with vocab_size={t_width} and the teacher's tokenizer."
        )
    logger.warning(
        "Student vocabulary (%d) and teacher vocabulary (%d) differ only by padding; distilling on the first %d "
        "logits they share.", s_width, t_width, small,
    )
    return small

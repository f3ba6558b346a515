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

from .architecture import logits_width, task_of

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
        if s_task == "classification":
            check_label_order(student, teacher)
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


def check_label_order(student: nn.Module, teacher: nn.Module) -> None:
    """Logits are compared class by class, so both models must name class ``i`` alike.

    Refused when both configs carry real class names (not transformers' default ``LABEL_i``) that differ at some
    index, naming both orders (a permuted teacher, the MNLI trap, would teach the wrong classes silently); a warning
    when only one side has names.
    """
    orders = []
    for model in (student, teacher):
        id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
        names = [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(len(id2label))]
        orders.append(names if any(n != f"LABEL_{i}" for i, n in enumerate(names)) else None)
    student_names, teacher_names = orders
    if student_names is not None and teacher_names is not None and student_names != teacher_names:
        same = sorted(student_names) == sorted(teacher_names)
        raise ValueError(
            f"The student's classes are {student_names} and the teacher's {teacher_names}: "
            + ("the same classes in another order, " if same else "different classes, ")
            + "so logit distillation would teach class i from the teacher's class i. Build the student with the "
            "teacher's id2label / label2id (and its labels mapped to them)."
        )
    if (student_names is None) != (teacher_names is None):
        named = "student" if student_names is not None else "teacher"
        logger.warning(
            "Only the %s's config names its classes (%s); hf_kd cannot check that both models order the classes "
            "alike. Give both the same id2label.", named, student_names or teacher_names,
        )

"""A teacher of the student's own architecture, trained first with plain cross-entropy: the teacher of Tf-KD_self
(Yuan et al., CVPR 2020, https://huggingface.co/papers/1909.11723) and of DR-KD (Amik et al.,
https://huggingface.co/papers/2201.11319)."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .choices import check_choice

logger = logging.getLogger(__name__)

Init = Literal["student", "scratch"]
WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def saved_model_in(folder: str) -> bool:
    """Whether ``folder`` holds a model written by ``save_pretrained`` (its config and its weights)."""
    return os.path.isfile(os.path.join(folder, CONFIG_NAME)) and any(
        os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)


def make_self_teacher(
    student: PreTrainedModel,
    args: TrainingArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    init: Init = "student",
    **trainer_kwargs: Any,
) -> nn.Module:
    """A copy of ``student``'s architecture trained on ``train_dataset`` with its own loss (cross-entropy for
    classifiers and causal LMs) by a plain ``transformers.Trainer(args=args, ...)``, saved with ``save_model()`` in
    ``args.output_dir`` and returned frozen (eval mode, no gradients): the teacher of Tf-KD_self and DR-KD, to pass
    as ``DistillationTrainer(teacher_model=..., distillers=[{"name": "kl", "rectify": True}])``.

    It is reusable: when ``args.output_dir`` already holds a saved model (``config.json`` and weights), that model is
    loaded with ``type(student).from_pretrained`` (with the student's ``attn_implementation``) and nothing is
    trained, so a second run, or a run after a crash past the save, costs nothing. Give the teacher its own
    ``output_dir`` (not the distillation run's), and a new one whenever the student's architecture or the data
    change.

    Args:
        student: The student (a ``PreTrainedModel``); it is not modified.
        args: The ``TrainingArguments`` of the teacher's training (its epochs / steps, learning rate, ``seed``,
            ``output_dir``, ...).
        train_dataset: What the teacher trains on: batches with ``labels``, as for a plain ``Trainer``.
        eval_dataset: Passed to the ``Trainer`` (evaluation during the teacher's training).
        init: ``"student"`` (default): the teacher starts from the student's current weights, so a pretrained
            student gives a teacher fine-tuned from the same checkpoint; ``"scratch"``: a fresh initialisation from
            the student's config under ``args.seed``, the papers' setting (the same architecture trained normally
            from scratch).
        **trainer_kwargs: Further ``Trainer`` arguments (``data_collator``, ``processing_class``,
            ``compute_metrics``, ``callbacks``, ...).
    """
    check_choice("make_self_teacher", "init", init, Init)
    if not isinstance(student, PreTrainedModel):
        raise TypeError(f"make_self_teacher copies a transformers PreTrainedModel; got {type(student).__name__}.")
    if saved_model_in(args.output_dir):
        logger.info("Loading the self-teacher saved in %s (no training); use another output_dir to retrain it.",
                    args.output_dir)
        teacher = type(student).from_pretrained(  # with the student's attention kernel, as the trained copy has
            args.output_dir, attn_implementation=student.config._attn_implementation)
    else:
        if init == "student":
            teacher = copy.deepcopy(student)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                teacher = type(student)(copy.deepcopy(student.config))
        trainer = Trainer(model=teacher, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          **trainer_kwargs)
        trainer.train()
        trainer.save_model()
    return teacher.eval().requires_grad_(False)

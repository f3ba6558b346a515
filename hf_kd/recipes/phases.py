"""The phases every recipe shares: per-phase arguments, cached models, plain training, distillation, evaluation, and
the loading options distillers need."""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import PartialState
from torch import nn
from transformers import Trainer

from ..arguments import DistillationArguments
from ..distillers import build_distiller
from ..trainer import DistillationTrainer


def phase_arguments(
    training_args: DistillationArguments,
    *,
    output_dir: str | Path,
    epochs: float | None = None,
    learning_rate: float | None = None,
    train_size: int | None = None,
) -> DistillationArguments:
    """A copy of ``training_args`` for one phase (teacher fine-tuning, baseline or distillation).

    ``max_steps`` caps every phase: when ``training_args.max_steps > 0`` the phase runs at most that many steps.
    Give ``train_size`` (examples) to let a phase whose epochs come to fewer steps stop there instead.
    """
    args = dataclasses.replace(
        training_args,
        output_dir=str(output_dir),
        num_train_epochs=training_args.num_train_epochs if epochs is None else epochs,
        learning_rate=training_args.learning_rate if learning_rate is None else learning_rate,
    )
    if args.max_steps > 0 and train_size is not None:
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        args.max_steps = min(args.max_steps, math.ceil(args.num_train_epochs * math.ceil(train_size / batch)))
    return args


def attention_options(distillers: list) -> dict[str, str]:
    """``from_pretrained`` / config keywords for the teacher and student of ``distillers``: eager attention when a
    distiller reads attention maps (the default SDPA attention returns none)."""
    reads_attention = any(build_distiller(spec).requires.attentions for spec in distillers)
    return {"attn_implementation": "eager"} if reads_attention else {}


def cached_model(cache_dir: str | Path, key: str, build: Callable[[Path], None]) -> Path:
    """The folder ``cache_dir/key``, built once by ``build(folder)`` (which must save a model with ``config.json``).

    The build writes to a staging folder that is renamed when complete, so an interrupted build leaves no
    half-written cache. With several processes (torchrun / accelerate launch) every process runs ``build`` (the
    training inside it is collective; the main process saves) and the main process alone checks and renames.
    """
    path = Path(cache_dir).expanduser() / key
    if (path / "config.json").is_file():
        print(f"reusing cached {key} at {path}")
        return path
    state = PartialState()
    staging = path.parent / f".{path.name}.building"
    if state.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
        staging.mkdir()
    state.wait_for_everyone()
    try:
        build(staging)
        state.wait_for_everyone()
        if state.is_main_process:
            if not (staging / "config.json").is_file():
                raise RuntimeError(f"Building the cached model {key!r} wrote no config.json; `build` must save a "
                                   "model into the folder it is given (e.g. model.save_pretrained(folder)).")
            shutil.rmtree(path, ignore_errors=True)  # a leftover without config.json
            staging.rename(path)
    finally:
        if state.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
    state.wait_for_everyone()
    print(f"cached {key} at {path}")
    return path


def train_model(
    model: nn.Module,
    args: DistillationArguments,
    *,
    teacher: nn.Module | list[nn.Module] | None = None,
    teacher_cache: str | Path | None = None,
    train_dataset: Any,
    eval_dataset: Any,
    compute_metrics: Callable | None,
    data_collator: Any = None,
    processing_class: Any = None,
) -> Trainer:
    """Train ``model``: with plain ``transformers.Trainer`` when neither ``teacher`` nor ``teacher_cache`` is given
    (the baseline, a teacher's own fine-tuning), else distilling ``teacher`` (or the cached teacher outputs in the
    folder ``teacher_cache``) into it with ``args.distillers``; returns the trained trainer."""
    inputs = dict(args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, compute_metrics=compute_metrics,
                  data_collator=data_collator, processing_class=processing_class)
    trainer = (Trainer(model=model, **inputs) if teacher is None and teacher_cache is None
               else DistillationTrainer(model=model, teacher_model=teacher, teacher_cache=teacher_cache, **inputs))
    trainer.train()
    return trainer


def evaluate_model(
    model: nn.Module,
    args: DistillationArguments,
    eval_dataset: Any,
    compute_metrics: Callable | None,
    data_collator: Any = None,
    processing_class: Any = None,
) -> dict[str, float]:
    """Evaluate ``model`` without training it (e.g. a cached teacher); the ``eval_*`` metrics."""
    trainer = Trainer(model=model, args=args, eval_dataset=eval_dataset, compute_metrics=compute_metrics,
                      data_collator=data_collator, processing_class=processing_class)
    return trainer.evaluate()

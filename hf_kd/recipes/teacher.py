"""The teacher of a recipe run: what :func:`~hf_kd.recipes.run_recipe` takes, and training one once into the cache."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..arguments import DistillationArguments
from .config import RecipeArguments
from .phases import cached_model, phase_arguments, train_model

TRAINING_RECORD = "hf_kd_finetune.json"  # beside a cached teacher: {"train_seconds": ...}


@dataclass
class Teacher:
    """The teacher as the recipe prepared it (loaded, fine-tuned or trained).

    Args:
        model: The teacher, ready to evaluate and distil from.
        path: Where its weights are: a local folder or a Hub id (the size on disk; the run's ``teacher_path``).
        name: How the model card names it.
        train_seconds: Its training / fine-tuning time when the recipe trained it, else None.
        history: Its training log when it was trained in this run (plotted as the ``teacher`` phase).
    """

    model: nn.Module
    path: str | Path
    name: str
    train_seconds: float | None = None
    history: list[dict] | None = None


def train_teacher(
    build: Callable[[], nn.Module],
    load: Callable[[str], nn.Module],
    name: str,
    args: RecipeArguments,
    training_args: DistillationArguments,
    key: str,
    *,
    train_dataset: Any,
    eval_dataset: Any = None,
    compute_metrics: Callable | None = None,
    processing_class: Any = None,
) -> Teacher:
    """The teacher ``build()`` trained for ``args.teacher_epochs`` epochs at ``args.teacher_finetune_learning_rate``
    (``max_steps`` caps it) in ``output_dir/teacher``, cached as ``args.cache_dir/key``: trained on the first run and
    reused by later ones (``key`` must hold everything that changes it), then ``load(folder)``-ed as the run uses it.

    With ``eval_dataset`` it is evaluated periodically like the students, else only once by the run. Its training
    seconds are kept beside the cache; its ``history`` is there when it was trained in this run.
    """
    history: list[dict] = []

    def train(folder: Path) -> None:
        phase = phase_arguments(training_args, output_dir=Path(training_args.output_dir) / "teacher",
                                epochs=args.teacher_epochs, learning_rate=args.teacher_finetune_learning_rate,
                                train_size=len(train_dataset))
        if eval_dataset is None:
            phase = dataclasses.replace(phase, eval_strategy="no")
        trainer = train_model(build(), phase, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              compute_metrics=compute_metrics, processing_class=processing_class)
        trainer.save_model(str(folder))
        history.extend(trainer.state.log_history)
        record = {"train_seconds": trainer.state.log_history[-1].get("train_runtime")}
        (folder / TRAINING_RECORD).write_text(json.dumps(record, indent=2))

    folder = cached_model(args.cache_dir, key, train)
    record = folder / TRAINING_RECORD
    seconds = json.loads(record.read_text())["train_seconds"] if record.is_file() else None
    return Teacher(load(str(folder)), folder, name, seconds, history or None)

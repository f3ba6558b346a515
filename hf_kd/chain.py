"""TAKD, KD through a chain of teacher assistants (Mirzadeh et al., AAAI 2020, https://huggingface.co/papers/1902.03393):
teacher -> assistant(s) -> student, as successive :class:`~hf_kd.DistillationTrainer` runs."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .arguments import DistillationArguments
from .choices import check_choice
from .distillers.base import Distiller
from .trainer import DistillationTrainer

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
Guides = Literal["previous", "all"]


def saved_model_in(directory: str) -> bool:
    """Whether ``directory`` holds a model written by ``save_model`` / ``save_pretrained`` (a config and weights)."""
    return os.path.isfile(os.path.join(directory, "config.json")) and any(
        os.path.isfile(os.path.join(directory, name)) for name in WEIGHT_FILES)


def distill_chain(
    models: Sequence[PreTrainedModel],
    teacher_model: PreTrainedModel,
    args: DistillationArguments,
    train_dataset: Any,
    eval_dataset: Any = None,
    distillers: Sequence[Distiller | Mapping[str, Any]] | None = None,
    guides: Guides = "previous",
    **trainer_kwargs: Any,
) -> list[PreTrainedModel]:
    """TAKD (Mirzadeh et al., AAAI 2020, https://huggingface.co/papers/1902.03393): distil ``teacher_model`` into
    ``models[0]`` (the largest assistant), that into ``models[1]``, ..., the last into ``models[-1]`` (the student).
    Stage ``i`` (from 1) is one :class:`~hf_kd.DistillationTrainer` run with ``teacher_model`` = the model trained by
    stage ``i - 1`` (the teacher for stage 1), the same ``distillers``, datasets and ``trainer_kwargs`` for every
    stage, and ``args`` with its ``output_dir`` replaced by ``<args.output_dir>/stage_<i>`` (``dataclasses.replace``:
    checkpoints and logs of a stage go there). The trained model is saved there with ``save_model``, so every stage
    reloads with a plain ``from_pretrained``.

    **Reuse:** a stage whose directory already holds a saved model (a ``config.json`` and weights) is not trained
    again: ``type(models[i]).from_pretrained(<stage dir>)`` takes its place, and the next stages distil from it. So
    a chain stopped after stage 2 continues with stage 3 when called again, and a chain whose stages are all saved
    returns them without training. A stage interrupted before its ``save_model`` is trained from the start. Delete a
    stage's directory to retrain it (and the stages after it read the new model only if theirs are deleted too).

    ``guides="all"`` gives stage ``i`` every model before it instead, ``teacher_model=[teacher, stage 1, ...,
    stage i - 1]`` (largest first), for the multi-teacher distillers: DGKD trains its assistants densely this way
    (``distillers=[{"name": "dgkd", "drop_num": 0}]``: stage 1 has one guide, so nothing can be dropped there), and
    ``ces_kd`` reads its experts in that order.

    ``distillers`` are dicts (``{"name": "kl", ...}``) or ``Distiller`` instances; each stage gets its own copy, so
    no state (projectors, banks) passes from one stage to the next. Without them, ``args.distillers`` or the
    trainer's default (``kl`` at temperature 2) serve every stage. A trained model is frozen (eval mode, no
    gradients) when the next stage uses it as its teacher.

    Returns:
        The trained (or reloaded) model of each stage, in the order of ``models``; the last is the student.
    """
    if not models:
        raise ValueError("distill_chain: `models` lists the assistants and then the student; got none.")
    check_choice("distill_chain", "guides", guides, Guides)
    trained: list[PreTrainedModel] = []
    for stage, model in enumerate(models, start=1):
        teacher = [teacher_model, *trained] if guides == "all" else (trained or [teacher_model])[-1]
        stage_dir = os.path.join(args.output_dir, f"stage_{stage}")
        if saved_model_in(stage_dir):
            model = type(model).from_pretrained(stage_dir, attn_implementation=model.config._attn_implementation)
        else:
            trainer = DistillationTrainer(
                model=model, teacher_model=teacher, args=dataclasses.replace(args, output_dir=stage_dir),
                train_dataset=train_dataset, eval_dataset=eval_dataset,
                distillers=None if distillers is None else copy.deepcopy(list(distillers)), **trainer_kwargs,
            )
            trainer.train()
            trainer.save_model(stage_dir)
        trained.append(model)
    return trained

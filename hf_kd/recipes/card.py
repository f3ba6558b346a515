"""A recipe's model card (``README.md``) for its distilled student: :func:`hf_kd.model_card.write_card` (the one card
writer, also ``DistillationTrainer.create_model_card``'s) with the recipe's results table and reproduce command."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..model_card import AUTO_CLASSES, auto_class_name, trainer_card_inputs, write_card
from .report import ModelResult, results_table

__all__ = ["AUTO_CLASSES", "auto_class_name", "write_model_card"]


def write_model_card(
    output_dir: str | Path,
    *,
    recipe: str,
    teacher: str,
    dataset: str,
    distillers: Sequence[Mapping[str, Any]],
    results: Mapping[str, ModelResult],
    base_model: str | None = None,
    trainer: Any = None,
) -> Path:
    """Write ``output_dir/README.md`` for the student saved there; returns its path.

    The model-index, ratios, speed-up and retention come from ``results["student"]`` and ``results["teacher"]``
    (the recipe's own measurements; the assistants' metrics, ``results["assistant_<i>"]``, join the model-index);
    with the distillation ``trainer``, also the distiller names (tags), the built distillers, the teacher's revision
    and the training hyperparameters.
    """
    student, teacher_result = results.get("student"), results.get("teacher")
    teachers = [role for role in results if role == "teacher" or role.startswith("assistant_")]
    inputs: dict[str, Any] = trainer_card_inputs(trainer) if trainer is not None else {}
    inputs.pop("auto_class", None)  # the saved folder's config.json names it
    latency = ({"student": student.latency_ms, "teacher": teacher_result.latency_ms}
               if student is not None and teacher_result is not None else None)
    return write_card(output_dir, **{
        **inputs,
        "teacher": teacher,
        "distillers": list(distillers),
        "base_model": base_model,
        "datasets": [dataset],
        "tags": [recipe],
        "student_metrics": student.metrics if student is not None else {},
        "teacher_metrics": {role: result.metrics for role, result in results.items() if role in teachers},
        "student_params": student.params if student is not None else None,
        "teacher_params": teacher_result.params if teacher_result is not None else None,
        "student_bytes": student.size_on_disk_bytes if student is not None else None,
        "teacher_bytes": teacher_result.size_on_disk_bytes if teacher_result is not None else None,
        "latency_ms": latency,
        "results_table": results_table(results),
        "intro": f"Distilled with the hf_kd recipe `{recipe}` from the teacher `{teacher}` on `{dataset}`.",
        "sections": ["## Reproduce", "", "```bash",
                     f"hf-kd run recipes/{recipe}.yaml    # or: python recipes/{recipe}.py", "```", ""],
    })

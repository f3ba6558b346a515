"""The run every recipe shares: evaluate the teacher, train the baseline, distil, then write the reports.

A recipe script prepares the pieces (data, teacher, student, how to measure a model) and hands them to
:func:`run_recipe`, which writes into ``training_args.output_dir``::

    baseline/        the student trained without distillation (when a baseline is given)
    student/         the distilled student, its processing class and model card (README.md)
    results.json     {role: name, params, size_on_disk_bytes, latency_ms, latency_spread_ms (IQR), metrics,
                     train_seconds, retention (trained models: metric / the teacher's), extra fields}
    results.md       the same as a table, then the notes, the compression, the retention and the wall seconds per
                     phase
    history.png      training loss components and the plotted eval metric over steps, per phase

With ``teacher_cache: auto`` (and the recipe's arguments given as ``recipe_args``) the teacher's outputs over the
train data are cached once in ``cache_dir`` (:mod:`hf_kd.recipes.teacher_cache`) and the distillation phase trains
from that folder; the teacher is still evaluated and reported. ``teacher_cache_only`` stops after building it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import Trainer

from ..arguments import DistillationArguments
from ..model_card import retention
from .card import write_model_card
from .config import RecipeArguments
from .phases import evaluate_model, phase_arguments, train_model
from .report import ModelResult, count_parameters, measure_latencies, plot_history, saved_size, write_results
from .teacher import Teacher
from .teacher_cache import AUTO, auto_teacher_cache, check_auto_cache
from .timer import PhaseTimer

ROLES = ("teacher", "baseline", "student")
Metrics = Callable[[Mapping[str, float]], dict[str, float]]


class RunOutput(TypedDict):
    """What :func:`run_recipe` (so every recipe's ``run``) returns."""

    results: dict[str, ModelResult]  # teacher, baseline (when trained), student
    student: nn.Module  # the distilled student
    histories: dict[str, list[dict]]  # log history per phase: teachers trained in this run, baseline, distillation
    seconds: dict[str, float]  # wall seconds per phase (the recipe's own, teacher_eval, baseline, distillation), total
    output_dir: str
    teacher_path: str
    student_path: str
    results_json: str
    results_md: str
    plot: str
    model_card: str
    teacher_cache: str | None  # the folder the distillation phase read the teacher from (teacher_cache: auto)


class CacheOutput(TypedDict):
    """What :func:`run_recipe` returns with ``teacher_cache_only``: the cache folder and the seconds of its build."""

    teacher_cache: str
    seconds: dict[str, float]


def run_recipe(
    recipe: str,
    training_args: DistillationArguments,
    *,
    teacher: Teacher,
    student: nn.Module,
    baseline: nn.Module | None,
    train_dataset: Any,
    eval_dataset: Any,
    metrics: Sequence[str] | Metrics,
    latency_batch: Mapping[str, Any],
    dataset: str,
    plot_metric: str,
    compute_metrics: Callable | None = None,
    data_collator: Any = None,
    processing_class: Any = None,
    distillation_args: DistillationArguments | None = None,
    plain_evaluation: bool = False,
    labels: Mapping[str, str] | None = None,
    extra: Callable[[nn.Module], dict[str, Any]] | None = None,
    model_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    notes: Sequence[str] | Callable[[Mapping[str, ModelResult]], Sequence[str]] = (),
    base_model: str | None = None,
    timer: PhaseTimer | None = None,
    assistants: Sequence[Teacher] = (),
    recipe_args: RecipeArguments | None = None,
) -> RunOutput | CacheOutput:
    """Evaluate ``teacher``, train ``baseline`` without distillation, distil ``teacher`` into ``student``, and write
    the results, the history plot and the student with its model card (see the module docstring).

    Both students train with ``phase_arguments(..., train_size=len(train_dataset))`` (``max_steps`` caps them) in
    ``output_dir/<role>``, where each is saved.

    Args:
        recipe: The recipe's name (model card tags, the reproduce command).
        training_args: The run's arguments; the baseline trains with them, the student with ``distillation_args``.
        teacher: The prepared teacher.
        student: The student to distil into (trained in place).
        baseline: The model trained with cross-entropy only (a copy of the student's initialisation), or None.
        train_dataset, eval_dataset, compute_metrics, data_collator, processing_class: As for ``Trainer``.
        metrics: The results' metrics of a model: the names of ``eval_*`` metrics to keep (``("accuracy",)``), or a
            function of the ``eval_*`` metrics (perplexity from ``eval_loss``), whose results are also added,
            ``eval_``-prefixed, to the eval entries of the histories, so derived metrics can be plotted.
        latency_batch: The inputs of the forward whose median milliseconds and spread are reported, measured once
            every model is trained, all models interleaved (``measure_latencies``).
        dataset: How the model card names the data.
        plot_metric: The eval metric plotted beside the losses (``eval_<plot_metric>`` in the histories).
        distillation_args: The distillation phase's arguments (e.g. other distillers); None: ``training_args``.
        plain_evaluation: Evaluate the trained students like the teacher, with a plain ``Trainer``; False: with
            their own trainer's ``evaluate()``.
        labels: The names of the roles in the results (``{"student": "student (KD)"}``); by default the roles.
        extra: ``extra(model)``: more fields of a model's ``results.json`` entry, e.g. a generated sample.
        model_metrics: ``model_metrics(model)``: more metrics measured on the trained model itself (not by the eval
            loop), joining its results' metrics (table, card, retention), e.g. the causal LM's ``teacher_nll``.
        notes: Lines under the results table, or ``notes(results)`` returning them.
        base_model: The model card's ``base_model`` (a Hub id the student derives from), or None.
        timer: The run's timer, started where the recipe began (its own phases already recorded); None: a new one.
        assistants: More prepared teachers: evaluated and reported like the teacher (roles ``assistant_<i>``) and
            distilled from after it, ``teacher_model=[teacher, *assistants]``.
        recipe_args: The recipe's arguments: ``cache_dir`` and the ``teacher_cache_*`` settings of
            ``teacher_cache: auto`` (required with it).
    """
    timer = timer or PhaseTimer()
    distillation_args = distillation_args or training_args
    cache = None
    if distillation_args.teacher_cache == AUTO:
        if recipe_args is None:
            raise ValueError("`teacher_cache: auto` builds the cache in the recipe's `cache_dir`: pass "
                             "run_recipe(..., recipe_args=args).")
        check_auto_cache(distillation_args, assistants)
        with timer.phase("teacher_cache"):
            cache = auto_teacher_cache(recipe, recipe_args, training_args, teacher.model, teacher.path, train_dataset,
                                       data_collator, processing_class)
        if recipe_args.teacher_cache_only:
            return CacheOutput(teacher_cache=str(cache), seconds=dict(timer.seconds))
        distillation_args = dataclasses.replace(distillation_args, teacher_cache=str(cache))
    elif recipe_args is not None and recipe_args.teacher_cache_only:
        raise ValueError("`teacher_cache_only` builds the cache of `teacher_cache: auto`; set `teacher_cache: auto` "
                         "too (hf-kd cache does), or drop `teacher_cache_only`.")
    if not callable(metrics):
        metrics = _named(metrics)
    output_dir = Path(training_args.output_dir)
    names = {**dict(zip(ROLES, ROLES)), **(labels or {})}
    inputs = dict(compute_metrics=compute_metrics, data_collator=data_collator, processing_class=processing_class)

    def evaluate(model: nn.Module, role: str) -> dict[str, float]:
        return evaluate_model(model, phase_arguments(training_args, output_dir=output_dir / role), eval_dataset,
                              **inputs)

    def result(role: str, model: nn.Module, path: str | Path, scores: Mapping[str, float],
               train_seconds: float | None) -> ModelResult:
        timed[role] = model  # its latency: measured with the others' once all are trained
        return ModelResult(names[role], count_parameters(model), saved_size(model, path), float("nan"),
                           {**metrics(scores), **(model_metrics(model) if model_metrics else {})}, train_seconds,
                           extra(model) if extra else {})

    def train(role: str, phase: str, model: nn.Module, args: DistillationArguments,
              distil_from: nn.Module | list[nn.Module] | None, teacher_cache: Path | None = None) -> Trainer:
        """Train ``model`` (plainly, or distilling ``distil_from`` or ``teacher_cache`` into it), save, evaluate and
        report it."""
        folder = output_dir / role
        args = phase_arguments(args, output_dir=folder, train_size=len(train_dataset))
        data = dict(train_dataset=train_dataset, eval_dataset=eval_dataset, **inputs)
        with timer.phase(phase):
            trainer = train_model(model, args, teacher=distil_from, teacher_cache=teacher_cache, **data)
        trainer.save_model(str(folder))
        histories[phase] = _with_metrics(trainer.state.log_history, metrics)
        scores = evaluate(trainer.model, role) if plain_evaluation else trainer.evaluate()
        results[role] = result(role, trainer.model, folder, scores, timer.seconds[phase])
        return trainer

    timed: dict[str, nn.Module] = {}
    teachers = {"teacher": teacher, **{f"assistant_{i}": a for i, a in enumerate(assistants, 1)}}
    names.update({role: f"{role} ({t.name})" for role, t in teachers.items() if role not in names})
    with timer.phase("teacher_eval"):
        results = {role: result(role, t.model, t.path, evaluate(t.model, role), t.train_seconds)
                   for role, t in teachers.items()}
    histories = {role: _with_metrics(t.history, metrics) for role, t in teachers.items() if t.history}
    if baseline is not None:
        train("baseline", "baseline", baseline, training_args, None)
    models = [t.model for t in teachers.values()]
    live = None if cache is not None else models if assistants else teacher.model
    trainer = train("student", "distillation", student, distillation_args, live, cache)
    for role, latency in measure_latencies(timed, latency_batch).items():
        results[role] = dataclasses.replace(results[role], latency_ms=latency.median_ms,
                                            latency_spread_ms=latency.spread_ms)
    for role in ("baseline", "student"):
        if role in results:
            results[role].retention = retention(results[role].metrics, results["teacher"].metrics)

    seconds = {**timer.seconds, "total": timer.elapsed()}
    student_dir = output_dir / "student"
    lines = [*(notes(results) if callable(notes) else notes),
             f"Compression: {results['teacher'].params / results['student'].params:.1f}x fewer parameters.",
             *(f"Retention of the {names[role]} (metric / the teacher's): "
               + ", ".join(f"{k} {v:.1%}" for k, v in results[role].retention.items()) + "."
               for role in ("baseline", "student") if results.get(role) and results[role].retention),
             "Wall seconds per phase: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "."]
    state = PartialState()
    reports = None
    if state.is_main_process:  # several processes (torchrun): the reports are written once
        json_path, md_path = write_results(output_dir, results, lines)
        plot = plot_history(histories, output_dir / "history.png", plot_metric)
        card = write_model_card(student_dir, recipe=recipe, teacher=", ".join(t.name for t in teachers.values()),
                                dataset=dataset, distillers=distillation_args.distillers or [],
                                results=results, base_model=base_model, trainer=trainer)
        print(md_path.read_text() + f"\nStudent saved to {student_dir}.")
        reports = [str(json_path), str(md_path), str(plot), str(card)]
    json_path, md_path, plot, card = broadcast_object_list([reports])[0]
    return RunOutput(results=results, student=trainer.model, histories=histories, seconds=seconds,
                     output_dir=str(output_dir), teacher_path=str(teacher.path), student_path=str(student_dir),
                     results_json=json_path, results_md=md_path, plot=plot, model_card=card,
                     teacher_cache=None if cache is None else str(cache))


def _named(names: Sequence[str]) -> Metrics:
    """The ``eval_<name>`` metrics of ``names`` that are present, without the prefix."""
    return lambda metrics: {name: metrics[f"eval_{name}"] for name in names if f"eval_{name}" in metrics}


def _with_metrics(history: list[dict], metrics: Metrics) -> list[dict]:
    """``history`` with each eval entry's ``metrics`` added as ``eval_<name>`` (e.g. perplexity from ``eval_loss``)."""
    return [{**entry, **{f"eval_{k}": v for k, v in metrics(entry).items()}} if "eval_loss" in entry else entry
            for entry in history]

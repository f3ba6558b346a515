"""The model card (``README.md``) of a distilled student: the one card writer of the trainer and the recipes.

The card's front matter validates with ``huggingface_hub.ModelCard`` / ``ModelCardData``:

* ``base_model``: the student's starting checkpoint (a Hub id; a local folder or a model built from a config has none),
* ``library_name: transformers``, ``pipeline_tag`` from the student's task (``text-classification``,
  ``image-classification``, ``text-generation``),
* ``tags``: ``hf-kd``, ``knowledge-distillation``, the caller's tags, the names of the distillers,
* ``datasets``, ``metrics`` (the student's metric names),
* ``model-index``: the student's eval metrics (its teacher agreement and KL to the teacher among them) and each
  teacher's (``metric_name`` "teacher <metric>"; with several teachers "teacher<i> <metric>", as their eval keys
  ``eval_teacher<i>_*``), from the last evaluation in ``trainer.state.log_history`` (the teachers' exist when
  ``DistillationArguments.teacher_eval_metrics`` ran).

Its body: the teacher (name, revision, parameters, size; with several, each one's name and the first's size), the
distillers (their specs: weights, temperatures, layer maps; and the built modules with their projectors), parameter
and size ratio, the measured latency speed-up (when given), retention (student metric / the first teacher's metric
for each metric both have, losses left out: lower is better there), the recipe's results table (when given),
training hyperparameters, library versions, and a load snippet with the right ``AutoModelFor*`` class.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.models.auto import modeling_auto

from .agreement import METRICS as AGREEMENT
from .trainer import OBJECTIVE

CARD_NAME = "README.md"
BASE_TAGS = ("hf-kd", "knowledge-distillation")
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
                "AutoModelForQuestionAnswering", "AutoModelForImageClassification", "AutoModelForMaskedLM",
                "AutoModelForSeq2SeqLM", "AutoModelForAudioClassification")
PIPELINE_TAGS = {"AutoModelForCausalLM": "text-generation", "AutoModelForSequenceClassification": "text-classification",
                 "AutoModelForImageClassification": "image-classification",
                 "AutoModelForTokenClassification": "token-classification",
                 "AutoModelForQuestionAnswering": "question-answering", "AutoModelForMaskedLM": "fill-mask",
                 "AutoModelForSeq2SeqLM": "text2text-generation",
                 "AutoModelForAudioClassification": "audio-classification"}
LOWER_IS_BETTER = ("loss", "nll", "perplexity", "mse")  # metric names whose ratio is no retention
# eval keys that are no model quality: Trainer's timings and the epoch
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
                   "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "bf16", "fp16",
                   "hard_label_weight", "teacher_dtype")


def auto_class_name(output_dir: str | Path | None = None, architectures: Sequence[str] = ()) -> str:
    """The ``AutoModel*`` class that loads the saved model in ``output_dir`` (or one of ``architectures``);
    ``AutoModel`` when none matches."""
    config = Path(output_dir) / "config.json" if output_dir is not None else None
    if config is not None and config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
    for name in AUTO_CLASSES:
        if set(architectures) & set(getattr(modeling_auto, name)._model_mapping._model_mapping.values()):
            return name
    return "AutoModel"


def split_metrics(log_history: Sequence[Mapping[str, Any]], prefix: str = "eval") -> tuple[dict, dict]:
    """The student's metrics and each teacher's of the last evaluation in ``log_history``, without prefixes.

    ``eval_accuracy`` -> student ``accuracy``; the agreement metrics ``eval_teacher_agreement`` and
    ``eval_kl_to_teacher`` are the student's (how closely it follows the teacher). The teachers' are keyed by the
    label their eval keys carry: ``eval_teacher_accuracy`` -> ``{"teacher": {"accuracy": ...}}``, with several
    teachers ``eval_teacher<i>_accuracy`` -> ``{"teacher<i>": {"accuracy": ...}}`` in teacher order. Loss components
    (``eval_loss/<name>``), the distillation objective and timings are left out."""
    teacher_key = re.compile(rf"{re.escape(prefix)}_(teacher\d*)_(.+)")
    student: dict[str, float] = {}
    teachers: dict[str, dict[str, float]] = {}
    for entry in reversed(log_history):
        numbers = {k: float(v) for k, v in entry.items() if k.startswith(f"{prefix}_") and "/" not in k
                   and isinstance(v, int | float) and not k.endswith(NOT_METRICS)}
        found: dict[str, dict[str, float]] = {}
        own: dict[str, float] = {}
        for key, value in numbers.items():
            match = teacher_key.fullmatch(key)
            if match and key[len(prefix) + 1:] not in AGREEMENT:
                found.setdefault(match[1], {})[match[2]] = value
            elif key != f"{prefix}_{OBJECTIVE}":
                own[key[len(prefix) + 1:]] = value
        if not student and "loss" in own:
            student = own
        for label, metrics in found.items():
            teachers.setdefault(label, metrics)  # the newest evaluation of each teacher
    return student, dict(sorted(teachers.items(), key=lambda item: int(item[0][len("teacher"):] or 0)))


def retention(student: Mapping[str, float], teacher: Mapping[str, float]) -> dict[str, float]:
    """``student[k] / teacher[k]`` for each metric both have; losses, NLLs and perplexities (lower is better, so a
    share means nothing) left out."""
    return {k: student[k] / teacher[k] for k in student
            if k in teacher and teacher[k] and not any(word in k for word in LOWER_IS_BETTER)}


def write_card(
    folder: str | Path,
    *,
    teacher: str,
    teacher_revision: str | None = None,
    teacher_params: int | None = None,
    teacher_bytes: int | None = None,
    student_params: int | None = None,
    student_bytes: int | None = None,
    distillers: Sequence[Mapping[str, Any]] = (),
    distiller_names: Sequence[str] = (),
    distiller_modules: Mapping[str, str] | None = None,
    student_metrics: Mapping[str, float] | None = None,
    teacher_metrics: Mapping[str, Mapping[str, float]] | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    tags: Sequence[str] = (),
    language: str | Sequence[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    auto_class: str | None = None,
    results_table: str | None = None,
    latency_ms: Mapping[str, float] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    intro: str | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write ``folder/README.md`` for the student saved in ``folder`` (see the module docstring); returns its path.

    Args:
        folder: The saved student (its ``config.json`` picks the ``AutoModelFor*`` class and the ``pipeline_tag``).
        teacher, teacher_revision, teacher_params, teacher_bytes: The teacher's name (Hub id or path), revision,
            number of parameters and bytes of weights.
        student_params, student_bytes: The student's; with the teacher's they give the ratios.
        distillers: The distiller specs (``{"name": ..., **options}``), written as JSON.
        distiller_names: The names of the built distillers, added to the tags.
        distiller_modules: ``{key: repr}`` of the built distillers (options, layer maps, projectors).
        student_metrics: The student's eval metrics without the ``eval_`` prefix.
        teacher_metrics: Each teacher's eval metrics by label, in teacher order (``{"teacher": {"accuracy": ...}}``,
            :func:`split_metrics`); the first is the one retention is measured against.
        base_model: The Hub id the student starts from, or None.
        datasets: Hub ids (or names) of the data; the first names the model-index results' dataset.
        tags, language, license, model_name: More front matter; ``model_name`` defaults to the folder's name.
        auto_class: The ``AutoModelFor*`` class of the student; None: from ``folder/config.json``.
        results_table: Markdown under "Results" (a recipe's table of every model).
        latency_ms: ``{"student": ms, "teacher": ms}`` of one forward, for the speed-up.
        hyperparameters: Training hyperparameters to list.
        intro: A paragraph under the title (default: what was distilled from what).
        sections: More Markdown sections at the end of the body (e.g. a recipe's reproduce command).
    """
    folder = Path(folder)
    student_metrics, teacher_metrics = dict(student_metrics or {}), dict(teacher_metrics or {})
    first_label, first = next(iter(teacher_metrics.items()), ("teacher", {}))
    model_name = model_name or folder.resolve().name
    auto_class = auto_class or auto_class_name(folder)
    pipeline_tag = PIPELINE_TAGS.get(auto_class)
    names = list(dict.fromkeys(n for n in distiller_names if n))
    all_tags = list(dict.fromkeys([*BASE_TAGS, *tags, *names]))
    dataset_name = datasets[0] if datasets else "evaluation set"
    results = []
    for role, metrics in (("student", student_metrics), *teacher_metrics.items()):
        for key, value in metrics.items():
            results.append(EvalResult(
                task_type=pipeline_tag or "other", dataset_type=datasets[0] if datasets else "custom",
                dataset_name=dataset_name, metric_type=key, metric_value=value,
                metric_name=key if role == "student" else f"{role} {key}"))
    card_data = ModelCardData(
        language=language, license=license, library_name="transformers", tags=all_tags,
        datasets=list(datasets) or None, metrics=list(student_metrics) or None, base_model=base_model,
        pipeline_tag=pipeline_tag, model_name=model_name if results else None, eval_results=results or None)

    lines = [f"# {model_name}", "",
             intro or f"A student distilled with hf_kd from the teacher `{teacher}`"
             + (f" on `{', '.join(datasets)}`." if datasets else "."), ""]
    lines += ["## Teacher", "", f"- name: `{teacher}`"]
    if teacher_revision:
        lines.append(f"- revision: `{teacher_revision}`")
    if teacher_params:
        lines.append(f"- parameters: {teacher_params:,}")
    if teacher_bytes:
        lines.append(f"- size: {teacher_bytes / 1e6:.2f} MB")
    lines += ["", "## Distillers", "", f"Specs: `{json.dumps(list(distillers))}`", ""]
    for key, text in (distiller_modules or {}).items():
        lines += [f"`{key}`:", "", "```", text, "```", ""]
    compression = []
    if student_params and teacher_params:
        compression.append(f"- parameters: {student_params:,} (student) vs {teacher_params:,} (teacher): "
                           f"{teacher_params / student_params:.2f}x fewer")
    if student_bytes and teacher_bytes:
        compression.append(f"- size: {student_bytes / 1e6:.2f} MB vs {teacher_bytes / 1e6:.2f} MB: "
                           f"{teacher_bytes / student_bytes:.2f}x smaller")
    if latency_ms and latency_ms.get("student") and latency_ms.get("teacher"):
        compression.append(f"- latency: {latency_ms['student']:.2f} ms vs {latency_ms['teacher']:.2f} ms per forward: "
                           f"{latency_ms['teacher'] / latency_ms['student']:.2f}x speed-up")
    if compression:
        lines += ["## Compression", "", *compression, ""]
    lines += ["## Results", ""]
    if results_table:
        lines += [results_table, ""]
    metric_names = list(dict.fromkeys([*student_metrics, *(k for m in teacher_metrics.values() for k in m)]))
    if metric_names and not results_table:
        columns = [student_metrics, *teacher_metrics.values()]
        lines += ["| " + " | ".join(["metric", "student", *teacher_metrics]) + " |", "|---" * len(columns) + "|---|"]
        lines += ["| " + " | ".join([k, *(_fmt(m.get(k)) for m in columns)]) + " |" for k in metric_names]
        lines.append("")
    kept = retention(student_metrics, first)
    if kept:
        lines += [f"Retention (student / {first_label}): " + ", ".join(f"{k} {v:.1%}" for k, v in kept.items())
                  + ".", ""]
    if not metric_names and not results_table:
        lines += ["No evaluation was run before this card was written.", ""]
    if hyperparameters:
        lines += ["## Training hyperparameters", "", *(f"- {k}: {v}" for k, v in hyperparameters.items()), ""]
    lines += ["## Library versions", "", *(f"- {k}: {v}" for k, v in library_versions().items()), ""]
    lines += [*sections]
    lines += ["## Use", "", "```python", f"from transformers import {auto_class}", "",
              f'model = {auto_class}.from_pretrained("path/to/{model_name}")', "```", ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_NAME
    path.write_text(str(card), encoding="utf-8")
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def library_versions() -> dict[str, str]:
    """The versions of transformers, torch and hf_kd."""
    import torch
    import transformers

    try:
        from importlib.metadata import version

        hf_kd = version("hf_kd")
    except Exception:  # not installed as a distribution (a source checkout)
        hf_kd = "source"
    return {"transformers": transformers.__version__, "torch": torch.__version__, "hf_kd": hf_kd}


def hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub id (not empty, not a local folder or file), else None."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return None
    return name


def trainer_card_inputs(trainer: Any, metric_key_prefix: str = "eval") -> dict[str, Any]:
    """What :func:`write_card` takes, read from a ``DistillationTrainer``: the teachers' names (or the cache), the
    distillers (specs, names, module reprs), the student's size and the first teacher's (``teacher_model[0]``: the
    ratios compare with it), the last evaluation's metrics of the student and of each teacher, the base model and
    the key hyperparameters."""
    from .architecture import unwrap

    student = unwrap(trainer.model)
    teachers = [unwrap(t) for t in getattr(trainer, "teachers", [])]
    config = getattr(teachers[0], "config", None) if teachers else None
    names = [getattr(getattr(t, "config", None), "_name_or_path", "") or type(t).__name__ for t in teachers]
    if len(teachers) > 1:  # labelled as their eval metrics are (eval_teacher<i>_*)
        teacher = ", ".join(f"teacher{i}: {name}" for i, name in enumerate(names))
    elif teachers:
        teacher = names[0]
    else:
        teacher = f"cached teacher outputs ({trainer.args.teacher_cache})"
    student_metrics, teacher_metrics = split_metrics(trainer.state.log_history, metric_key_prefix)
    args = trainer.args
    hyperparameters = {k: getattr(getattr(args, k), "value", getattr(args, k)) for k in HYPERPARAMETERS
                       if hasattr(args, k)}  # enums by their value
    hyperparameters["train_steps"] = trainer.state.global_step
    return dict(
        teacher=teacher,
        teacher_revision=getattr(config, "_commit_hash", None) if config is not None else None,
        teacher_params=sum(p.numel() for p in teachers[0].parameters()) if teachers else None,
        teacher_bytes=sum(p.numel() * p.element_size() for p in teachers[0].parameters()) if teachers else None,
        student_params=sum(p.numel() for p in student.parameters()),
        student_bytes=sum(p.numel() * p.element_size() for p in student.parameters()),
        distillers=[_plain(spec) for spec in trainer._distiller_specs],
        distiller_names=[getattr(d, "name", None) or type(d).__name__ for d in trainer.distillers],
        distiller_modules={key: repr(d) for key, d in zip(trainer.distiller_keys, trainer.distillers)},
        student_metrics=student_metrics,
        teacher_metrics=teacher_metrics,
        base_model=hub_id(getattr(getattr(student, "config", None), "_name_or_path", None)),
        hyperparameters=hyperparameters,
        auto_class=auto_class_name(architectures=[type(student).__name__]),
    )


def _plain(spec: Any) -> Any:
    """A distiller spec as JSON-able data: a dict as given, a ``Distiller`` instance by its name and options."""
    if isinstance(spec, Mapping):
        return json.loads(json.dumps(dict(spec), default=str))
    return {"name": getattr(spec, "name", type(spec).__name__), "repr": spec.extra_repr()}


MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin")
WEIGHT_INDEXES = {"model.safetensors.index.json": "model.safetensors",
                  "pytorch_model.bin.index.json": "pytorch_model.bin"}


def student_files(folder: str | Path, processing_class: Any = None, distillers: Sequence[Any] = ()) -> list[str]:
    """The files of the student saved in ``folder`` that a Hub upload takes (paths relative to ``folder``): config,
    generation config, weights (the shards an index names), custom code, the processing class's files, the files
    the distillers' ``on_save`` write (e.g. ATSC's MLP shared classifier) and the card. Nothing else in the folder
    (training arguments, distiller state, checkpoints, caches, logs) is one of them."""
    import tempfile

    folder = Path(folder)
    names = [n for n in MODEL_FILES if (folder / n).is_file()]
    for index, single in WEIGHT_INDEXES.items():
        if (folder / index).is_file():
            names += [index, *sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))]
        elif (folder / single).is_file():
            names.append(single)
    config = folder / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("auto_map"):  # remote code beside the weights
        names += sorted(p.name for p in folder.glob("*.py"))
    with tempfile.TemporaryDirectory() as scratch:  # which files the processing class and the distillers write
        if processing_class is not None and hasattr(processing_class, "save_pretrained"):
            processing_class.save_pretrained(scratch)
        for distiller in distillers:
            distiller.on_save(scratch)
        written = sorted(str(p.relative_to(scratch)) for p in Path(scratch).rglob("*") if p.is_file())
    names += [n for n in written if (folder / n).is_file()]
    if (folder / CARD_NAME).is_file():
        names.append(CARD_NAME)
    return list(dict.fromkeys(names))

"""The contract every distiller implements, and the registry that builds them by name.

A distiller is an ``nn.Module``: its projectors, memory banks or auxiliary branches are submodules, so the trainer
puts their trainable parameters in the optimizer (own param group) and their state in every checkpoint, and never
in the exported student.

Life cycle inside :class:`~hf_kd.DistillationTrainer`:

1. ``setup(student, teacher)`` once, before training: size projectors from the two configs and raise on
   configurations that cannot work.
2. At each optimizer step the schedules of its knobs (``weight``, ``temperature``, ...) are applied.
3. ``forward(student, teacher, batch)`` returns a scalar loss, or ``(loss, {sub_term: value})`` to log sub-terms.
   Distillers whose loss is a sum over rows of logits implement ``row_loss`` instead (see
   :class:`~hf_kd.distillers.logit.LogitDistiller`) and are evaluated together in one chunked pass.

   **Normalisation** (:mod:`hf_kd.normalization`): the returned loss is read as a mean over the samples of
   ``batch``, and the trainer weights each micro-batch by its share of the optimizer step's global batch. A
   per-sample loss is therefore just ``per_sample.mean()``; a per-token loss uses
   :func:`~hf_kd.normalization.token_mean` (or :func:`~hf_kd.normalization.batch_mean` for either), which divides
   by the token count of the global batch. Both are exact under gradient accumulation and several processes. A term
   defined on the samples of one batch (relations, contrasts) sets ``batch_level = True`` and is weighted by the
   micro-batch's share. Sub-terms follow the same rule.
4. ``on_step_end()`` after each optimizer step (memory-bank updates and the like); ``on_save(output_dir)`` each
   time the student is saved.

**Several teachers.** ``DistillationTrainer(teacher_model=[t0, t1, ...])`` takes a list. A distiller reads one of
them, ``teacher_index`` (default 0; the spec key ``"teacher"``: ``{"name": "kl", "teacher": 1}``), and its
``setup`` / ``forward`` receive that teacher / its view. A distiller with ``multi_teacher = True`` (e.g. ATSC) reads
all of them: ``setup`` receives the list of teachers and ``forward`` the list of their views, in the given order.
``{"teacher": "all"}`` makes any single-teacher distiller one copy per teacher, losses averaged
(:mod:`hf_kd.distillers.each_teacher`: e.g. one projector per teacher).

A distiller that keeps state per training sample sets ``needs_sample_index = True``: the trainer then adds an
index column to the train dataset, hands it to the distillers as ``batch[SAMPLE_INDEX]`` in training batches (never
to the models) and sets ``dataset_size`` before ``setup`` (:mod:`hf_kd.sample_index`).

Optional hooks: ``student_features()`` / ``teacher_features()`` name submodules whose outputs are captured with
forward hooks; ``student_forward_context()`` / ``teacher_forward_context()`` wrap the two forward passes;
``teacher_parameters()`` declares teacher-side parameters an online method trains. Only a distiller that declares
teacher parameters receives teacher tensors with autograd history; every other one reads a detached view, even when
another distiller trains the teacher.

The total loss is ``hard_label_weight * student_loss + sum_i weight_i * distiller_i``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..capture import FeatureSpec, ModelView, Requirements
from ..schedules import Schedule

_REGISTRY: dict[str, type[Distiller]] = {}
# The taxonomy shared by the README, docs/distillers.md and ``Distiller.family``.
FAMILIES = ("logit", "representation", "relation", "online", "composite")
T = TypeVar("T")


# The optional hooks of the contract, and how a distiller that holds others (``composite``) serves each: call it on
# every child ("each"), take the union of the children's answers ("union"), or nest the children's contexts
# ("nested"). A hook added to Distiller goes here too; a test checks that the table covers every hook.
CONTRACT_HOOKS: dict[str, str] = {
    "setup": "each",
    "set_progress": "each",
    "on_step_end": "each",
    "on_save": "each",
    "student_features": "union",
    "teacher_features": "union",
    "teacher_parameters": "union",
    "teachers_read": "union",
    "student_forward_context": "nested",
    "teacher_forward_context": "nested",
}


def register_distiller(name: str):
    """Class decorator: make a distiller buildable from ``{"name": name, **kwargs}``."""

    def decorate(cls: type[Distiller]) -> type[Distiller]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"A distiller named {name!r} is already registered ({_REGISTRY[name].__name__}).")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_distillers() -> list[str]:
    """The registry names that ``DistillationArguments.distillers`` and ``build_distiller`` accept."""
    return sorted(_REGISTRY)


def build_distiller(spec: Distiller | Mapping[str, Any]) -> Distiller:
    """A distiller from an instance (returned as is) or a dict ``{"name": ..., **kwargs}``."""
    if isinstance(spec, Distiller):
        return spec
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(
            f"A distiller is given as a Distiller instance or a dict like {{'name': 'kl', 'temperature': 2.0}}; "
            f"got {spec!r}."
        )
    kwargs = dict(spec)
    name = kwargs.pop("name")
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown distiller {name!r}. Valid names: {', '.join(list_distillers())} (on the command line: "
            f"--distillers '[{{\"name\": \"kl\", \"temperature\": 2.0}}]')."
        )
    cls = _REGISTRY[name]
    teacher_index = kwargs.pop("teacher", None)
    if teacher_index is not None and cls.multi_teacher:
        raise ValueError(f"Distiller {name!r} reads every teacher; remove its `teacher` option.")
    if teacher_index == "all":  # one copy per teacher (each_teacher.py)
        from .each_teacher import EachTeacherDistiller

        return EachTeacherDistiller({"name": name, **kwargs})
    if teacher_index is not None and (isinstance(teacher_index, bool) or not isinstance(teacher_index, int)
                                      or teacher_index < 0):
        raise ValueError(
            f"Distiller {name!r}: `teacher` is the position of its teacher in `teacher_model=[...]` (an int >= 0), "
            f"or \"all\" for one copy per teacher; got {teacher_index!r}."
        )
    accepted = _init_parameters(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"Distiller {name!r} has no option(s) {unknown}. Its options are: {', '.join(sorted(accepted))}."
        )
    distiller = cls(**kwargs)
    if teacher_index is not None:
        distiller.teacher_index = teacher_index
    return distiller


def distiller_keys(distillers: Sequence[Distiller]) -> list[str]:
    """Registry names, numbered when a name repeats (``kl``, ``kl_2``); used in logs as ``loss/<key>``."""
    keys, seen = [], {}
    for distiller in distillers:
        name = distiller.name or type(distiller).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys


def teacher_of(distiller: Distiller, teachers: Sequence[T]) -> T | list[T] | None:
    """What ``distiller`` reads of ``teachers`` (models or views): all of them (``multi_teacher``), else the one at
    ``teacher_index`` (``None`` when there are no teachers)."""
    if distiller.multi_teacher:
        return list(teachers)
    return teachers[distiller.teacher_index] if teachers else None


def ordered_union(groups: Iterable[Iterable]) -> tuple:
    """The items of all groups, each once, in first-seen order (e.g. the features several distillers capture)."""
    return tuple(dict.fromkeys(item for group in groups for item in group))


def trains_teacher(distiller: Distiller) -> bool:
    """Whether ``distiller`` declares teacher-side parameters (and so may read teacher tensors with autograd)."""
    return next(iter(distiller.teacher_parameters()), None) is not None


def teacher_side_parameters(teacher: nn.Module | None, modules: Sequence[str] | str | None, method: str) -> list:
    """The parameters an online method trains in the teacher (what its ``teacher_parameters()`` returns): all of
    them (``modules=None``) or those of the named submodules (dotted names, the method's ``teacher_modules``)."""
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


def batch_labels(batch: Mapping[str, Any], method: str) -> torch.Tensor:
    """``batch["labels"]`` (one class index per sample), or an error naming ``method``."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"{method} needs `labels` (one class index per sample) in every batch.")
    return labels


def teacher_views_for(distiller: Distiller, teachers: Sequence[ModelView | None]):
    """The teacher view(s) ``distiller`` reads, detached unless it trains teacher-side parameters."""
    views = teacher_of(distiller, teachers)
    if trains_teacher(distiller):
        return views
    if isinstance(views, list):
        return [v.detached() if v is not None else None for v in views]
    return views.detached() if views is not None else None


def weighted_losses(
    named: Iterable[tuple[str, Distiller]],
    student: ModelView,
    teachers: Sequence[ModelView | None],
    batch: Mapping[str, Any],
) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
    """Call each distiller with the teacher view(s) it reads (:func:`teacher_views_for`):
    ``(sum_i weight_i * L_i, {name_i: L_i, name_i/part: ...})``."""
    total: torch.Tensor | float = 0.0
    values: dict[str, torch.Tensor] = {}
    for name, distiller in named:
        result = distiller(student, teacher_views_for(distiller, teachers), batch)
        value, parts = result if isinstance(result, tuple) else (result, {})
        total = total + distiller.weight * value
        values[name] = value
        values.update({f"{name}/{part}": v for part, v in parts.items()})
    return total, values


def _init_parameters(cls: type) -> set[str]:
    """Keyword options of ``cls``: its ``__init__`` parameters, plus its parents' while it forwards ``**kwargs``."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {p for p, v in params.items() if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)}
        if klass is Distiller or not any(v.kind == v.VAR_KEYWORD for v in params.values()):
            return names
    return names


class Distiller(nn.Module):
    """Base class of all distillers.

    Args:
        weight: Factor of this distiller's loss in the total loss; a number, a :class:`~hf_kd.Schedule`, or a
            schedule dict such as ``{"schedule": "linear", "start": 0.0, "end": 1.0}``.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""  # built-ins: one of FAMILIES, the section of docs/distillers.md that documents it
    requires: ClassVar[Requirements] = Requirements()
    teacher_train_mode: ClassVar[bool] = False  # run the teacher in train mode (dropout, BN) while training
    multi_teacher: ClassVar[bool] = False  # setup/forward receive every teacher (lists) instead of one
    batch_level: ClassVar[bool] = False  # the loss is defined on the batch as a whole (see hf_kd.normalization)
    # ``row_loss`` reads a top-k cached teacher as it is (hf_kd.sparse_logits.SparseLogits), not as dense logits
    reads_sparse_teacher: bool = False
    # Each training batch carries its samples' train-dataset positions as batch[SAMPLE_INDEX] (hf_kd.sample_index),
    # and ``dataset_size`` (the train dataset's length) is set before ``setup``.
    needs_sample_index: ClassVar[bool] = False
    dataset_size: int | None = None
    teacher_index: int = 0  # which teacher of `teacher_model=[...]` a single-teacher distiller reads

    def __init__(self, weight: float | Schedule | Mapping[str, Any] = 1.0) -> None:
        super().__init__()
        self.schedules: dict[str, Schedule] = {}
        self.global_step = 0
        self.weight = self.schedulable("weight", weight)

    def schedulable(
        self,
        attr: str,
        value: float | Schedule | Mapping[str, Any],
        *,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float:
        """Register ``value`` (number or schedule) as the knob ``attr`` and return its value at step 0.

        Every value the knob can take must be ``>= 0`` (``> 0`` with ``positive``) and at most ``maximum``, checked
        here, before training.
        """
        label = f"Distiller {self.name or type(self).__name__!r}"
        if isinstance(value, Mapping):
            try:
                value = Schedule.from_dict(value)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{label}: `{attr}` schedule {dict(value)!r} is invalid: {error}") from None
        if isinstance(value, Schedule):
            self.schedules[attr] = value
            candidates = value.values()
        else:
            candidates = [value]
        for v in candidates:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(
                    f"{label}: `{attr}` must be a number or a schedule dict such as {{'schedule': 'linear', "
                    f"'start': 0.0, 'end': 1.0}}; got {v!r} ({type(v).__name__})."
                )
        candidates = [float(v) for v in candidates]
        initial = value(0) if isinstance(value, Schedule) else candidates[0]
        lower = "> 0" if positive else ">= 0"
        bounds = f"{lower} and <= {maximum}" if maximum is not None else lower
        for v in candidates:
            if not math.isfinite(v):
                raise ValueError(f"{label}: `{attr}` must be a finite number, got {v}.")
            if v < 0 or (positive and v == 0) or (maximum is not None and v > maximum):
                raise ValueError(f"{label}: `{attr}` must be {bounds}, got {v}. Set `{attr}` within those bounds.")
        return initial

    def set_progress(self, step: int, max_steps: int | None) -> None:
        """Apply every schedule for optimizer step ``step`` (called by the trainer as each step begins)."""
        self.global_step = step
        for attr, schedule in self.schedules.items():
            setattr(self, attr, schedule(step, max_steps))

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Check the student/teacher pair and build parameters sized from their configs (override as needed)."""

    def forward(
        self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any]
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward() or row_loss().")

    def student_features(self) -> Iterable[FeatureSpec]:
        """Student submodule outputs/inputs to capture with forward hooks (known after ``setup``)."""
        return ()

    def teacher_features(self) -> Iterable[FeatureSpec]:
        """Teacher submodule outputs/inputs to capture with forward hooks (known after ``setup``)."""
        return ()

    def student_forward_context(self, student: nn.Module, training: bool) -> contextlib.AbstractContextManager:
        """A context the student's forward pass runs in, for methods that alter it during training (e.g. swapping in
        teacher blocks). Whatever it installs must be gone when it exits, so evaluation and export see the plain
        student."""
        return contextlib.nullcontext()

    def teacher_forward_context(self, teacher: nn.Module, training: bool) -> contextlib.AbstractContextManager:
        """A context the teacher's forward pass runs in (e.g. hooks recording what a teacher block received);
        whatever it installs must be gone when it exits."""
        return contextlib.nullcontext()

    def teacher_parameters(self) -> Iterable[nn.Parameter]:
        """Teacher-side parameters this distiller trains (online methods; known after ``setup``).

        The trainer unfreezes them, runs the teacher with autograd, trains them in their own param group
        (``DistillationArguments.teacher_learning_rate``) and checkpoints them. Empty: the teacher stays frozen and
        runs under ``torch.inference_mode()``.
        """
        return ()

    def teachers_read(self, count: int, training: bool) -> Iterable[int]:
        """The teachers (positions in ``teacher_model``, of ``count``) this distiller reads in the coming forward
        pass; all by default. A method that leaves some out at some steps (dgkd's dropped guides, ces_kd's experts
        its curriculum has not opened) names the ones it reads: a teacher that no distiller reads at a step does not
        run, and its view is ``None``."""
        return range(count)

    def on_step_end(self) -> None:
        """Called after every optimizer step."""

    def on_save(self, output_dir: str) -> None:
        """Called whenever the trainer saves the student (``save_model`` and checkpoints), after its weights are
        written: write the files an exported student needs beside them (e.g. ATSC's non-linear shared classifier)."""

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

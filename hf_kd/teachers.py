"""Teachers: preparing them, the checks that a teacher/student pair can be distilled, and :class:`TeacherSlot`.

A teacher is frozen (``eval()``, ``requires_grad=False``), cast to the requested dtype and placed through
Accelerate with ``prepare_model(..., evaluation_mode=True)``: it is never wrapped for training, never in the
optimizer and never part of the saved student. A :class:`TeacherSlot` holds what the trainer knows of one teacher
(computed once, when the trainer is built) and runs its forward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn

from .architecture import Task, accepted_inputs, logits_width, output_head, task_of, unwrap
from .capture import FeatureSpec, ModelView, capture_features, capture_head_input
from .distillers.base import ordered_union
from .sharding import is_sharded

if TYPE_CHECKING:
    from .distillers.base import Distiller

logger = logging.getLogger(__name__)


def prepare_teacher(teacher: nn.Module, accelerator: Accelerator, dtype: torch.dtype | None,
                    device: str | None = None, place: bool = True) -> nn.Module:
    """Freeze ``teacher``, cast it to ``dtype`` (if given) and place it on ``device``, or by default on the
    training device(s); ``place=False`` leaves it where it is (a teacher about to be sharded, whose shards alone
    move to the device)."""
    if dtype is not None:
        teacher = teacher.to(dtype=dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    if device is not None:
        return teacher.to(device)
    return accelerator.prepare_model(teacher, evaluation_mode=True) if place else teacher


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


def teacher_list(teacher_model: nn.Module | Sequence[nn.Module] | None) -> list[nn.Module]:
    """``teacher_model=`` as a list: empty (no teacher), one model, or the given non-empty list of models."""
    if teacher_model is None:
        return []
    if isinstance(teacher_model, nn.Module):
        return [teacher_model]
    teachers = list(teacher_model)
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise TypeError("`teacher_model` is a model or a non-empty list of models.")
    return teachers


def teacher_role(index: int, count: int) -> str:
    """How messages name teacher ``index`` of ``count``: ``"teacher"`` alone, else ``"teacher <index>"``."""
    return f"teacher {index}" if count > 1 else "teacher"


def readers_of(distillers: Iterable[Distiller], index: int) -> tuple[Distiller, ...]:
    """The distillers that read teacher ``index``: those that need a teacher and read all of them or this one."""
    return tuple(d for d in distillers if d.requires.teacher and (d.multi_teacher or d.teacher_index == index))


@dataclass(eq=False)
class TeacherSlot:
    """One teacher of a :class:`~hf_kd.DistillationTrainer`: its models, what its distillers read of it, and its
    forward pass. Everything is fixed when the trainer is built (after the distillers' ``setup``), so a step only
    runs :meth:`forward`.

    Attributes:
        index: Its position in ``teacher_model=[...]`` (what a distiller's ``teacher_index`` names).
        role: How messages name it: ``"teacher"``, or ``"teacher <index>"`` when there are several.
        model: The prepared teacher (an entry of ``trainer.teachers``); the forward pass calls it.
        bare: ``model`` without wrappers: what distillers, hooks and checks see.
        readers: The distillers that read it (:func:`readers_of`).
        features: The submodule outputs its readers capture (the union of their ``teacher_features()``).
        frozen: No parameter of it is trained (no distiller declares one in ``teacher_parameters()``): it runs
            without autograd (:attr:`inference`).
        train_mode: Some reader runs it in train mode (dropout, BN) while training (``teacher_train_mode``).
        task: Its head (:func:`~hf_kd.capture.task_of`).
        head: Its linear output head when logits are exactly ``head(hidden)`` (the fused causal-LM path), else None.
        accepts: Which batch keys its ``forward`` takes (:func:`~hf_kd.capture.accepted_inputs`).
        device: Where it runs when that is not the student's device (``teacher_device``): its inputs are moved there
            and its outputs back to ``student_device``; None: where the student is.
        student_device: The student's device (where a teacher on ``device`` returns its outputs).
        cached: False: a model runs (a :class:`~hf_kd.cache_slot.CacheSlot`, which reads a cache, says True).
    """

    index: int
    role: str
    model: nn.Module
    bare: nn.Module
    readers: tuple[Distiller, ...]
    features: tuple[FeatureSpec, ...]
    frozen: bool
    train_mode: bool
    task: Task
    head: nn.Linear | None
    accepts: Callable[[str], bool]
    device: torch.device | None = None
    student_device: torch.device | None = None
    cached: bool = False

    @classmethod
    def build(cls, model: nn.Module, index: int, count: int, readers: Sequence[Distiller],
              trained: Iterable[nn.Parameter], student_device: torch.device, device: str | None = None,
              fused_head: bool = True) -> TeacherSlot:
        """The slot of the prepared teacher ``model``, teacher ``index`` of ``count``, read by ``readers``;
        ``trained``: every teacher-side parameter the distillers train; ``device``: ``teacher_device``;
        ``fused_head``: whether its head's weight is whole after its forward (not under DeepSpeed ZeRO-3), so that
        the fused causal-LM path can use it."""
        bare = unwrap(model)
        trained_ids = {id(p) for p in trained}
        elsewhere = device is not None and torch.device(device) != torch.device(student_device)
        return cls(
            index=index,
            role=teacher_role(index, count),
            model=model,
            bare=bare,
            readers=tuple(readers),
            features=ordered_union(d.teacher_features() for d in readers),
            frozen=not any(id(p) in trained_ids for p in bare.parameters()),
            train_mode=any(d.teacher_train_mode for d in readers),
            task=task_of(bare),
            head=output_head(bare) if fused_head and not elsewhere else None,
            accepts=accepted_inputs(bare),
            device=torch.device(device) if elsewhere else None,
            student_device=torch.device(student_device),
        )

    @property
    def inference(self) -> bool:
        """Whether it runs under ``torch.inference_mode()``: frozen and not sharded (FSDP2 gathers parameters into
        buffers it updates in place in every later forward, evaluation's ``no_grad`` ones included, which inference
        tensors refuse), else frozen ones run under ``no_grad``."""
        return self.frozen and not is_sharded(self.model)

    @property
    def runs(self) -> bool:
        """Whether some distiller reads it; a teacher no distiller reads never runs."""
        return bool(self.readers)

    def forward(self, batch: Mapping[str, Any], flags: Mapping[str, bool], fused: bool, training: bool) -> ModelView:
        """Run the teacher on the inputs of ``batch`` it takes, with the output ``flags`` (``output_hidden_states``,
        ``output_attentions``) and its readers' forward contexts, capturing its features (and on the ``fused`` path
        the input of its head instead of logits). A frozen teacher runs under ``torch.inference_mode()`` (``no_grad``
        when sharded) and its view holds ordinary copies of the tensors distillers may save for backward."""
        if self.train_mode:
            self.model.train(training)
        head = self.head if fused else None
        inputs = {k: v for k, v in batch.items() if self.accepts(k)}
        if self.device is not None:
            inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode() if self.inference else
                                torch.no_grad() if self.frozen else contextlib.nullcontext())
            for distiller in self.readers:
                stack.enter_context(distiller.teacher_forward_context(self.bare, training))
            captured = stack.enter_context(capture_head_input(head)) if fused else {}
            features = stack.enter_context(capture_features(self.bare, self.features))
            outputs = self.model(**inputs, **flags)
        view = ModelView.from_outputs(self.bare, self.task, outputs, captured.get("input"), head,
                                      features=features, copy=self.inference)
        return view if self.device is None else view.to(self.student_device)

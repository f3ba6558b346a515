"""The checks that a distillation run can start, and that each batch fits it: teachers the distillers name, outputs the
models return, shared inputs and logits, batch lengths and labels, and (once, on the first training batch) whether
the fused causal-LM head path reproduces every model's logits; and, at the first training log, whether one weighted
loss term swamps the others.

Each check raises a ``ValueError`` / ``TypeError``, or warns, saying how to fix the run; the trainer calls them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import learned_positions, output_head
from .capture import Requirements, capture_head_input
from .distillers.base import Distiller
from .teachers import shared_logit_width

logger = logging.getLogger(__name__)

Named = Sequence[tuple[str, Distiller]]  # the trainer's distillers by key
Roles = Sequence[tuple[str, nn.Module]]  # models by role: ("student", ...), ("teacher", ...) / ("teacher 1", ...)


def check_teacher_indices(named: Named, count: int) -> None:
    """Every distiller that needs a teacher has one: ``count`` teachers, each single-teacher distiller's index below
    it."""
    needing = [key for key, d in named if d.requires.teacher]
    if needing and count == 0:
        raise ValueError(f"Distillers {needing} need a teacher: pass `teacher_model=` to DistillationTrainer.")
    for key, distiller in named:
        if not distiller.requires.teacher:
            continue
        if not distiller.multi_teacher and distiller.teacher_index >= count:
            raise ValueError(
                f"Distiller {key!r} reads teacher {distiller.teacher_index} (its `teacher` option), but "
                f"`teacher_model` has {count} teacher(s); use an index below {count}."
            )


def check_outputs_available(requirements: Requirements, models: Roles) -> None:
    """When a distiller reads attention maps, every model computes them (eager attention)."""
    if not requirements.attentions:
        return
    for role, model in models:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
        if implementation != "eager":
            raise ValueError(
                f"A distiller reads attention maps, but the {role} uses attn_implementation="
                f"{implementation!r}, which returns none. Load it with "
                f"from_pretrained(..., attn_implementation='eager')."
            )


def check_same_inputs(student: nn.Module, teachers: Roles) -> None:
    """Student and teachers must read the same kind of input (token ids, pixels, ...)."""
    wanted = getattr(student, "main_input_name", None)
    for role, teacher in teachers:
        theirs = getattr(teacher, "main_input_name", None)
        if wanted and theirs and theirs != wanted:
            named = "the teacher" if len(teachers) == 1 else role
            raise ValueError(
                f"The student ({type(student).__name__}) reads `{wanted}` but {named} ({type(teacher).__name__}) "
                f"reads `{theirs}`: distillation needs both on the same inputs. Use a teacher of the student's "
                f"modality."
            )


def check_logit_widths(student: nn.Module, teachers: Sequence[nn.Module], readers: Sequence[Sequence[Distiller]],
                       tokenizer: Any = None) -> None:
    """Each teacher some distiller reads logits of shares its logits with the student (:func:`shared_logit_width`);
    ``readers[i]``: the distillers that read ``teachers[i]``. With several teachers the error names the one."""
    for index, (teacher, reading) in enumerate(zip(teachers, readers)):
        logit_readers = [d.name for d in reading if d.requires.logits]
        if not logit_readers:
            continue
        try:
            shared_logit_width(student, teacher, tokenizer)
        except ValueError as error:
            if len(teachers) == 1:
                raise
            raise ValueError(f"teacher_model[{index}] (read by {logit_readers}): {error} Or leave that teacher to "
                             "the representation distillers (`teacher`: the other indices).") from None


def position_limits(models: Roles) -> list[tuple[str, int]]:
    """``(role, max_position_embeddings)`` of the models with a learned position table, which fails past it."""
    return [(role, limit) for role, model in models if (limit := learned_positions(model)) is not None]


def check_batch(inputs: Mapping[str, Any], limits: Sequence[tuple[str, int]], hard_label_weight: float,
                named: Named) -> None:
    """A batch fits the run: no longer than any model's learned positions (``limits``, :func:`position_limits`), and
    with labels when the student's own loss is weighted or a distiller needs them."""
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() >= 2:
        for role, limit in limits:
            if ids.shape[-1] > limit:
                raise ValueError(
                    f"A batch of {ids.shape[-1]} tokens is longer than the {role}'s max_position_embeddings={limit} "
                    f"(learned positions). Truncate the inputs, e.g. tokenizer(..., truncation=True, "
                    f"max_length={limit})."
                )
    if "labels" in inputs:
        return
    if hard_label_weight > 0:
        raise ValueError(
            f"hard_label_weight={hard_label_weight} but the batch has no `labels`. Set "
            "hard_label_weight=0 for pure distillation, or give the batch labels (e.g. a `label` column, or "
            "DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LMs)."
        )
    needing = [(key, d.requires.labels_for) for key, d in named if d.requires.labels]
    if needing:
        reasons = "".join(f" {key}: {why}." for key, why in needing if why)
        raise ValueError(
            f"Distillers {[key for key, _ in needing]} need `labels` in every batch, and this batch has none.{reasons} "
            "Give the batch labels (a `label` column; for causal LMs DataCollatorForLanguageModeling(tokenizer, "
            "mlm=False)) or leave those distillers out."
        )


def check_fused_path(models: Sequence[tuple[str, nn.Module, Callable[[str], bool]]], batch: Mapping[str, Any]) -> bool:
    """Whether every model's logits are exactly its output head applied to the head's input (a ``forward()`` that
    masks or scales logits afterwards is caught here), tried on the first sample of ``batch``; ``models``: ``(role,
    bare model, accepted inputs)``. Warns, naming the model, when the run must fall back to the plain logits path."""
    sample = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    for role, bare, accepts in models:
        head = output_head(bare)
        with torch.no_grad(), capture_head_input(head, skip_logits=False) as captured:
            logits = bare(**{k: v for k, v in sample.items() if accepts(k)}).logits
        fused = F.linear(captured["input"], head.weight, head.bias)
        if not torch.allclose(fused.float(), logits.float(), rtol=1e-3, atol=1e-3, equal_nan=True):
            logger.warning(
                "The %s (%s) returns logits that are not its output head applied to the head's input (its "
                "forward() masks, scales or caps them); token-level losses use the plain logits path for this "
                "run (fused_lm_loss has no effect).", role, type(bare).__name__,
            )
            return False
    logger.info("Token-level losses use the fused head path (logits formed chunk by chunk).")
    return True


def warn_on_dominant_term(window: Mapping[str, float], weights: Mapping[str, float]) -> None:
    """Warn when one weighted term is over 100x another (e.g. hidden-state MSE on an LLM's residual stream, ~1e4,
    beside a KL of ~1), which silently swamps the others; ``window``: logged means ``loss/<name>``, ``weights``: each
    term's weight by name (``hard`` and the distillers' keys)."""
    terms = {name: abs(window[f"loss/{name}"]) * weight for name, weight in weights.items()
             if f"loss/{name}" in window and weight > 0}
    positive = {name: value for name, value in terms.items() if value > 0}
    if len(positive) < 2:
        return
    big, small = max(positive, key=positive.get), min(positive, key=positive.get)
    if positive[big] > 100 * positive[small]:
        logger.warning(
            "The weighted term %r (%.3g) is %.0fx the term %r (%.3g): it dominates the loss. Lower its weight, or "
            "use a scale-free loss (e.g. hidden_states with loss='cosine').", big, positive[big],
            positive[big] / positive[small], small, positive[small],
        )

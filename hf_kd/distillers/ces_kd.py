"""CES-KD, curriculum-based expert selection (Amara et al., https://huggingface.co/papers/2209.07606; no code).

``ces_kd``: one expert (the teacher or a teacher assistant) per row, picked by a named selection
(:func:`register_ces_selection` adds one), among the experts a curriculum has opened so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..capture import ModelView, Requirements
from ..normalization import denominator
from ..row_loss import RowBatch, rows_from_views
from ..schedules import Knob, Schedule
from .base import Distiller, register_distiller
from .guides import kl_to_guide

Selection = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]

_SELECTIONS: dict[str, Selection] = {}
# The curriculum: the experts open from the smallest alone at the first step to all of them over the training.
DEFAULT_PACE = Schedule("linear", start=0.0, end=1.0)


def register_ces_selection(name: str):
    """Decorator: make ``fn(logits, targets) -> choice`` usable as ``ces_kd``'s ``selection=name``. ``logits`` are
    the open experts' logits on the batch's rows (``[n, C]`` each, in the models' dtype), **smallest expert first**;
    ``targets`` the rows' true classes (``[n]``); ``choice`` (``[n]``, integer) the index into ``logits`` of each
    row's expert."""

    def decorate(fn: Selection) -> Selection:
        _SELECTIONS[name] = fn
        return fn

    return decorate


@register_ces_selection("smallest_correct")
def smallest_correct(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The smallest expert whose top class is the row's true class; the largest (open) expert when none is."""
    correct = torch.stack([z.argmax(-1) == targets for z in logits])  # [E, n]
    first = correct.int().argmax(0)  # the first maximum: the smallest correct expert
    return torch.where(correct.any(0), first, torch.full_like(first, len(logits) - 1))


@register_ces_selection("largest")
def largest(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Every row to the largest open expert (with all open: plain KD from the teacher), for ablations."""
    return torch.full_like(targets, len(logits) - 1, dtype=torch.long)


@register_ces_selection("smallest")
def smallest(logits: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Every row to the smallest expert, for ablations."""
    return torch.zeros_like(targets, dtype=torch.long)


@register_distiller("ces_kd")
class CESKDDistiller(Distiller):
    """CES-KD, curriculum-based expert selection (Amara et al., https://huggingface.co/papers/2209.07606): the
    student learns each row (sample, or predicted token of a causal LM) from **one** expert ``e(x)`` of the teacher
    and its assistants, ``teacher_model=[teacher, assistant_1, ..., assistant_n]``, listed **from largest to
    smallest** (:meth:`setup` checks that the parameter counts do not increase along the list)::

        L = CE(y, p_s) + T^2 * KL(p_e(x)^T || p_s^T)

    ``CE`` is the trainer's ``hard_label_weight`` term; this distiller returns the KL, averaged over the rows of the
    optimizer step's global batch like every logit distiller.

    **Unverified** (the paper released no code and only its abstract was available): the routing and the pacing. The
    forms here, both configurable:

    - **Selection** (``selection``): ``"smallest_correct"`` (default): the smallest open expert whose top class is
      the row's true class, else the largest open expert (the teacher once all are open): an easy row, one a small
      expert gets right, learns from that small expert, a hard row from a larger one. ``"largest"`` and
      ``"smallest"`` send every row to one end, for ablations; a callable, or a name registered with
      :func:`register_ces_selection`, routes otherwise.
    - **Curriculum** (``pace``, a number in ``[0, 1]`` or a schedule): of ``G`` experts the ``min(G, floor(pace * G)
      + 1)`` smallest are open, so ``pace`` walks up the ladder in equal strata. The default, a linear schedule from
      0 to 1 over the training's steps, starts with the smallest assistant alone and opens one larger expert per
      ``1/G`` of the training, the teacher in the last ``1/G``. ``pace=1`` opens every expert from the start. An expert
      not yet open does not run (:meth:`teachers_read`), unless another distiller reads it.

    Needs labels (the selection reads the true class): the trainer refuses a batch without them before it runs.
    Logged per expert ``k`` (its position in ``teacher_model``): ``routed_<k>``, the fraction of the step's rows
    routed to it, and ``open_experts``. With one teacher the loss is ``kl``'s.

    The experts' logits on the rows are gathered for the selection, so the experts must expose logits: with
    :class:`~hf_kd.DistillationTrainer` they do (a distiller that reads logits turns the fused causal-LM head path
    off); views on the fused path (``logits=None``, only the head's input) are refused with an error.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` (number or schedule); 4, the common CIFAR value (unverified for CES-KD).
        selection: Name of a registered selection, or a callable ``fn(logits, targets) -> choice``.
        pace: Fraction of the expert ladder open (number or schedule, within ``[0, 1]``).
    """

    family = "logit"
    requires = Requirements(logits=True, labels=True)
    multi_teacher = True

    def __init__(self, weight: Knob = 1.0, temperature: Knob = 4.0, selection: str | Selection = "smallest_correct",
                 pace: Knob = DEFAULT_PACE) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        self.pace = self.schedulable("pace", pace, maximum=1.0)
        if isinstance(selection, str):
            if selection not in _SELECTIONS:
                raise ValueError(f"ces_kd: unknown `selection` {selection!r}. Valid names: "
                                 f"{', '.join(sorted(_SELECTIONS))} (or a callable, or register_ces_selection).")
            self.selection_fn = _SELECTIONS[selection]
        elif callable(selection):
            self.selection_fn = selection
        else:
            raise ValueError(f"ces_kd: `selection` must be a name or a callable, got {selection!r}.")

    def setup(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        counts = [sum(p.numel() for p in teacher.parameters()) for teacher in teachers]
        for k in range(1, len(counts)):
            if counts[k] > counts[k - 1]:
                raise ValueError(
                    f"ces_kd: list the experts from largest to smallest, teacher_model=[teacher, largest assistant, "
                    f"..., smallest assistant]; teacher {k} has {counts[k]:,} parameters, more than teacher {k - 1} "
                    f"({counts[k - 1]:,}). Reorder `teacher_model` (parameter counts: {counts})."
                )

    def open_experts(self, count: int) -> int:
        """How many of ``count`` experts (the smallest first) are open at the current ``pace``."""
        return min(count, math.floor(self.pace * count + 1e-9) + 1)  # 1e-9: a stratum's edge is not lost to rounding

    def route(self, teachers: Sequence[ModelView | None], rows: Sequence[RowBatch | None]) -> torch.Tensor:
        """Each row's expert, as its position in ``teacher_model`` (``[n]``), among the open experts (whose
        ``teachers`` and ``rows`` are set; a closed expert's are ``None``)."""
        targets = rows[-1].targets
        if targets is None:
            raise ValueError("ces_kd needs `labels` in every batch: the selection reads each row's true class.")
        ladder = list(range(len(teachers) - 1, -1, -1))[: self.open_experts(len(teachers))]  # smallest first
        width = min(rows[k].vocab_size for k in ladder)
        logits = []
        for k in ladder:
            if teachers[k].logits is None:
                raise ValueError(
                    f"ces_kd routes rows by the experts' predictions, so it needs their logits; teacher {k} gave "
                    "none (the fused causal-LM head path). Run with fused_lm_loss=False.")
            logits.append(teachers[k].logits.reshape(-1, teachers[k].logits.shape[-1])[rows[k].rows, :width])
        with torch.no_grad():
            choice = self.selection_fn(logits, targets)
        if choice.shape != targets.shape or choice.is_floating_point():
            raise ValueError(f"ces_kd: the selection must return one integer expert index per row, shape "
                             f"{tuple(targets.shape)}; got {choice.dtype} of shape {tuple(choice.shape)}.")
        if choice.numel() and (int(choice.min()) < 0 or int(choice.max()) >= len(ladder)):
            raise ValueError(f"ces_kd: the selection returned expert indices outside [0, {len(ladder)}) (the open "
                             "experts, smallest first).")
        return torch.tensor(ladder, device=choice.device)[choice.long()]

    def teachers_read(self, count: int, training: bool) -> list[int]:
        """The open experts: one the curriculum has not opened does not run."""
        return list(range(count - self.open_experts(count), count))

    def forward(self, student: ModelView, teachers: Sequence[ModelView | None], batch: Mapping[str, Any]):
        open_count = self.open_experts(len(teachers))
        rows = [None if k < len(teachers) - open_count else rows_from_views(student, teacher, batch)
                for k, teacher in enumerate(teachers)]
        route = self.route(teachers, rows)
        total = sum(kl_to_guide(rows[k], batch, self.temperature, keep=route == k)
                    for k in range(len(teachers) - open_count, len(teachers)))
        count = denominator(batch, "rows", route.numel())
        parts = {f"routed_{k}": (route == k).sum() / count for k in range(len(teachers))}
        parts["open_experts"] = torch.tensor(float(open_count), device=route.device)
        return total, parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, pace={self.pace}"

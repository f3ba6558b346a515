"""Non-finite losses (``DistillationArguments.nonfinite_loss``): name the components and the likely cause, then stop
(``"raise"``) or skip the optimizer step (``"skip_step"``) on every process alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

from .capture import ModelView

if TYPE_CHECKING:
    from .teachers import TeacherSlot

logger = logging.getLogger(__name__)


class NonFiniteSteps:
    """The ``nonfinite_loss`` policy of one run and the steps it skipped.

    :meth:`check` runs on every training micro-batch, :meth:`agree` before each optimizer step (``"skip_step"``),
    :meth:`close_step` at its end.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.skip_this_step = False  # some micro-batch of the current optimizer step had a non-finite loss
        self.skipped_steps = 0

    def check(self, total: torch.Tensor, components: Mapping[str, torch.Tensor], student: ModelView,
              slots: Sequence[TeacherSlot], teachers: Sequence[ModelView | None], step: int) -> None:
        """Stop (``"raise"``) or mark the step for skipping when the loss is not finite, naming the components and
        the likely cause. One check of a value that is reduced anyway (Trainer checks it too)."""
        if bool(torch.isfinite(total.detach())):
            return
        bad = [name for name, value in components.items() if not bool(torch.isfinite(value.detach()).all())]
        message = (
            f"The distillation loss is not finite at step {step}: component(s) "
            f"{', '.join(bad) or 'none alone, their weighted sum'}. {nonfinite_cause(student, slots, teachers)}"
        )
        if self.policy == "raise":
            raise FloatingPointError(message + " Set nonfinite_loss='skip_step' to skip such steps instead.")
        if not self.skip_this_step:
            logger.warning("%s Skipping this optimizer step (nonfinite_loss='skip_step').", message)
        self.skip_this_step = True

    def agree(self, accelerator: Accelerator, device: torch.device) -> bool:
        """Before the optimizer step: whether to skip it, the same on every process (one skips, all skip); a
        skipped step is counted."""
        skip = torch.tensor(float(self.skip_this_step), device=device)
        if accelerator.num_processes > 1:
            skip = accelerator.reduce(skip, reduction="sum")
        self.skip_this_step = bool(skip > 0)
        self.skipped_steps += int(self.skip_this_step)
        return self.skip_this_step

    def close_step(self) -> bool:
        """At the end of the optimizer step: whether its values are kept (it was not skipped); the next step starts
        unmarked."""
        keep = not self.skip_this_step
        self.skip_this_step = False
        return keep


def nonfinite_cause(student: ModelView, slots: Sequence[TeacherSlot], teachers: Sequence[ModelView | None]) -> str:
    """The likely cause of a non-finite loss (knobs are finite: they are checked when given), read off the outputs of
    the step that produced it; ``teachers[i]``: the view of ``slots[i]`` (None when it did not run)."""
    for slot, view in zip(slots, teachers):
        out = None if view is None else (view.logits if view.logits is not None else view.head_input)
        if out is None:
            continue
        if bool(torch.isnan(out).any() | torch.isposinf(out).any()):
            hint = " fp16 overflow? Use teacher_dtype='bfloat16' (or float32)." if out.dtype == torch.float16 else ""
            return f"The {slot.role}'s outputs are not finite (NaN or +inf in {out.dtype}).{hint}"
        if bool(torch.isneginf(out).any()):
            return (
                f"The {slot.role}'s logits are -inf at some entries (a masked vocabulary), where reverse KL and logit "
                f"MSE are infinite by definition; use kl, jsd, tvd, skew_kl or skew_reverse_kl there, which take "
                f"0 * log 0 = 0."
            )
        if view.model is not None and next(view.model.parameters()).dtype == torch.float16:  # None: a cache
            return (f"The {slot.role} runs in float16, whose logits overflow above 65504: fp16 overflow? Use "
                    f"teacher_dtype='bfloat16' (or float32).")
    out = student.logits if student.logits is not None else student.head_input
    if out is not None and not bool(torch.isfinite(out).all()):
        return ("The student's outputs are not finite: training diverged (lower learning_rate, set max_grad_norm) or "
                "its dtype overflows.")
    return "Check the learning rate and this batch's inputs."

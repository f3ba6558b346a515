"""Callbacks of the distillation loop.

:class:`DistillationCallback` adds one event to ``TrainerCallback``: ``on_distillation_step`` receives the loss
components of every optimizer step. The trainer dispatches it only to callbacks that define it, and reads the
component values off the device only when at least one callback does.

:class:`ScheduleCallback` is installed by the trainer: it applies every distiller's schedules at the start of each
optimizer step and calls the distillers' ``on_step_end`` after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from .distillers.base import Distiller


class DistillationCallback(TrainerCallback):
    """Base for callbacks that react to distillation events, on top of every ``TrainerCallback`` event."""

    def on_distillation_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        losses: dict[str, float],
        **kwargs,
    ) -> TrainerControl | None:
        """Called after each optimizer step with ``{"loss": total, "loss/hard": ..., "loss/<name>": ...}``.

        Values are summed over the micro-batches of the step, on the same scale as the ``loss`` that is logged.
        """


class ScheduleCallback(TrainerCallback):
    """Drives the distillers: schedules before each optimizer step, ``on_step_end`` after it."""

    def __init__(self, distillers: Sequence["Distiller"]) -> None:
        self.distillers = list(distillers)

    def _apply(self, state: TrainerState) -> None:
        for distiller in self.distillers:
            distiller.set_progress(state.global_step, state.max_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._apply(state)

    def on_step_end(self, args, state, control, **kwargs):
        for distiller in self.distillers:
            distiller.on_step_end()

"""Callbacks of the distillation loop.

:class:`DistillationCallback` adds one event to ``TrainerCallback``: ``on_distillation_step`` receives the loss
components of every optimizer step. The trainer dispatches it only to callbacks that define it, and reads the
component values off the device only when at least one callback does.

:class:`StepCallback` is internal: the trainer installs it to do its share of each optimizer step (the distillers'
schedules and ``on_step_end``, gradients of distiller and teacher-side parameters, skipped steps).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from .trainer import DistillationTrainer


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


class StepCallback(TrainerCallback):
    """Internal (installed by :class:`~hf_kd.DistillationTrainer`, not an API): the trainer's share of each optimizer
    step, where Trainer only does the student's.

    - train begin, step begin: every distiller's schedules for the step (``set_progress``);
    - before the optimizer step: gradients of distiller and teacher-side parameters averaged over processes, and with
      ``nonfinite_loss="skip_step"`` a step marked on any process skipped on all (its gradients dropped);
    - after the optimizer step: those gradients cleared;
    - step end: the distillers' ``on_step_end``, then the step closed in the ledger and ``on_distillation_step``
      sent to the callbacks that define it;
    - train end: the step's sample/token counts dropped (``compute_loss`` outside training normalises each batch on
      its own).
    """

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def _set_progress(self, state: TrainerState) -> None:
        for distiller in self.trainer.distillers:
            distiller.set_progress(state.global_step, state.max_steps)

    def on_train_begin(self, args, state, control, **kwargs):
        self._set_progress(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_progress(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer, accelerator = self.trainer, self.trainer.accelerator
        if accelerator.num_processes > 1:
            for param in trainer.online_parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")
        if args.nonfinite_loss == "skip_step" and trainer._nonfinite.agree(accelerator, args.device):
            for group in trainer.optimizer.param_groups:  # no gradient, no update (parameters without .grad stay)
                for param in group["params"]:
                    param.grad = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.trainer.online_parameters():
            param.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        for distiller in self.trainer.distillers:
            distiller.on_step_end()
        self.trainer._end_step(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._step_counts = None

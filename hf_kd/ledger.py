"""Bookkeeping of loss components, on the device, so logging costs no synchronisation per step.

Training values are added on the same scale as the ``loss`` the Trainer accumulates (each micro-batch weighted by its
share of the step's global batch, :mod:`hf_kd.normalization`), summed over the step, and join the logging window
when the step closes (a skipped step's values never do), so averaging them over the window exactly as the Trainer
averages ``loss`` gives comparable numbers. Evaluation values are averaged over samples, like ``eval_loss``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LossLedger:
    """Running sums of named loss components for the logging window, the current step and evaluation."""

    def __init__(self) -> None:
        self.window: dict[str, torch.Tensor] = {}
        self.step: dict[str, torch.Tensor] = {}
        self.window_start: int | None = None
        self.eval_sums: dict[str, torch.Tensor] = {}
        self.eval_count = 0

    def add_train(self, values: dict[str, torch.Tensor], global_step: int) -> None:
        if self.window_start is None:
            self.window_start = global_step
        for name, value in values.items():
            value = value.detach().float()
            self.step[name] = self.step[name] + value if name in self.step else value

    def close_step(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """End the optimizer step: its sums join the logging window unless ``keep`` is false (a skipped step)."""
        step, self.step = self.step, {}
        if keep:
            for name, value in step.items():
                self.window[name] = self.window[name] + value if name in self.window else value
        return step

    def add_eval(self, values: dict[str, torch.Tensor], batch_size: int) -> None:
        for name, value in values.items():
            value = value.detach().float() * batch_size
            self.eval_sums[name] = self.eval_sums[name] + value if name in self.eval_sums else value
        self.eval_count += batch_size

    def pop_window(self, global_step: int, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """Mean per optimizer step since the last call, averaged over processes (like the logged ``loss``)."""
        steps = global_step - (self.window_start if self.window_start is not None else global_step)
        logs = {}
        if steps > 0:
            logs = {name: gather(value).mean().item() / steps for name, value in self.window.items()}
        self.window, self.window_start = {}, None
        return logs

    def pop_eval(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        if not self.eval_count:
            return {}
        count = gather(torch.tensor(float(self.eval_count), device=next(iter(self.eval_sums.values())).device)).sum()
        values = {name: (gather(value).sum() / count).item() for name, value in self.eval_sums.items()}
        self.eval_sums, self.eval_count = {}, 0
        return values

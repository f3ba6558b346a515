"""A ``TrainerCallback`` that records each optimizer step's wall time, shared by the benchmarks that time training."""

from __future__ import annotations

import statistics
import time

from transformers import TrainerCallback


class StepTimes(TrainerCallback):
    """``times``: seconds of each optimizer step (from the end of the previous one; the first from train begin)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self.start)
        self.start = now

    def median(self, warmup: int) -> float:
        """The median step time after the first ``warmup`` steps."""
        return statistics.median(self.times[warmup:])

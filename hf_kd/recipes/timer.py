"""Wall-clock seconds of a recipe run: per named phase, and in all since the run began."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """``with timer.phase("baseline"): ...`` records the block's wall seconds under ``timer.seconds["baseline"]``;
    :meth:`elapsed` is the time since the timer was made (make it where the run begins)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as the phase ``name``."""
        began = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - began

    def elapsed(self) -> float:
        """Wall seconds since the timer was made."""
        return time.perf_counter() - self.start

"""Schedules for any scalar knob of a distiller (``weight``, ``temperature``, ...).

A schedule maps the optimizer step to a value. It is a pure function of ``(step, max_steps)``, so a run resumed
from a checkpoint picks up exactly where it stopped. The trainer applies every distiller's schedules at the start of
each optimizer step.

In a distiller dict, a schedule is written in place of the number it drives::

    {"name": "kl", "temperature": {"schedule": "linear", "start": 4.0, "end": 1.0}}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .choices import choices_of
from .configs import from_dict

ScheduleKind = Literal["constant", "linear", "cosine", "step"]
_KINDS = choices_of(ScheduleKind)


@dataclass
class Schedule:
    """A value that changes with the optimizer step.

    - ``constant``: ``start`` at every step.
    - ``linear``: ``start`` until ``start_step``, then a straight line to ``end`` at ``end_step``, then ``end``.
    - ``cosine``: like ``linear`` but along half a cosine: ``end + (start - end) * (1 + cos(pi * t)) / 2``.
    - ``step``: ``start * gamma ** k`` where ``k`` is the number of ``milestones`` already reached.

    ``end_step=None`` means the last step of training (``max_steps``). Before training starts (a freshly built
    trainer), the value is the one at step 0.
    """

    schedule: ScheduleKind = "constant"
    start: float = 1.0
    end: float | None = None
    start_step: int = 0
    end_step: int | None = None
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.schedule not in _KINDS:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of {', '.join(_KINDS)}.")
        if self.schedule in ("linear", "cosine") and self.end is None:
            raise ValueError(f"A {self.schedule!r} schedule needs `end` (the value at `end_step`).")
        self.milestones = tuple(sorted(int(m) for m in self.milestones))

    @classmethod
    def jump(cls, before: float, after: float, step: int) -> Schedule:
        """``before`` until optimizer step ``step``, ``after`` from it on (a zero-length ramp)."""
        return cls("linear", start=before, end=after, start_step=step, end_step=step)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Schedule:
        if "schedule" not in spec:  # without it the dataclass default would silently make a constant
            raise ValueError(
                f"A schedule dict needs its kind, `schedule`: one of {', '.join(_KINDS)} (e.g. {{'schedule': "
                f"'linear', 'start': 0.0, 'end': 1.0}}); got {dict(spec)!r}."
            )
        return from_dict(cls, spec, "schedule")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def values(self) -> list[float]:
        """Every value the schedule can take (used to validate bounds up front)."""
        if self.schedule == "step":
            return [self.start * self.gamma**k for k in range(len(self.milestones) + 1)]
        if self.schedule == "constant":
            return [self.start]
        return [self.start, self.end]

    def __call__(self, step: int, max_steps: int | None = None) -> float:
        if self.schedule == "constant":
            return self.start
        if self.schedule == "step":
            reached = sum(step >= m for m in self.milestones)
            return self.start * self.gamma**reached
        end_step = self.end_step if self.end_step is not None else max_steps
        if end_step is None or (self.end_step is None and not max_steps):  # training length unknown (no train())
            return self.start
        if end_step <= self.start_step:  # a jump rather than a ramp
            return self.start if step < self.start_step else self.end
        progress = min(max((step - self.start_step) / (end_step - self.start_step), 0.0), 1.0)
        if self.schedule == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2.0
        return self.start + (self.end - self.start) * progress


Knob = float | Schedule | Mapping[str, Any]
"""A distiller option that may change with the step: a number, a :class:`Schedule`, or a schedule dict."""

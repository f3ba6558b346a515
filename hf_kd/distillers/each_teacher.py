"""``teacher: "all"``: one copy of a single-teacher distiller per teacher, their losses averaged.

With ``teacher_model=[t_1, ..., t_K]``, ``{"name": "hidden_states", "teacher": "all", ...}`` builds one
``hidden_states`` per teacher, each with its own projectors and layer map sized from its own teacher, so teachers of
different widths and depths serve one representation distiller::

    L = (1 / K) * sum_k L_k(student, t_k)

``weight`` (number or schedule; by default the method's own) multiplies ``L``; every other option is given to
each copy. Logged sub-terms:
``<key>/teacher<k>`` (the unweighted ``L_k``) and the copies' own as ``<key>/teacher<k>/<part>``. A teacher only a
logit distiller could not read (another vocabulary) may serve a representation distiller this way. For logit
distillers ``teacher_aggregation`` (one target from all teachers, inside the shared row pass and the fused causal-LM
path) is usually what is wanted; ``teacher: "all"`` on them averages the per-teacher losses instead, each copy in its
own row pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..capture import ModelView
from .base import Distiller, build_distiller, weighted_losses
from .composite import CompositeDistiller


class EachTeacherDistiller(CompositeDistiller):
    """One copy of the distiller of ``spec`` per teacher (module docstring); built by ``build_distiller`` for a spec
    with ``teacher: "all"``, not by name. The copies are ``components["teacher<k>"]``: the first exists from the
    start (it answers what the trainer asks before ``setup``), the others are made by :meth:`setup` from the
    number of teachers.

    Args:
        spec: The distiller's spec without ``teacher`` (``{"name": ..., **options}``).
    """

    multi_teacher = True

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = {key: value for key, value in spec.items() if key != "weight"}
        first = build_distiller({**spec, "teacher": 0})
        weight = first.schedules.get("weight", first.weight)  # the spec's, else the method's default
        super().__init__({"teacher0": _unweighted(first)}, weight=weight)
        first = self.components["teacher0"]
        if first.multi_teacher:
            raise ValueError(f"Distiller {first.name!r} reads every teacher already; remove its `teacher` option.")
        if not first.requires.teacher:
            raise ValueError(f"Distiller {first.name!r} reads no teacher; remove its `teacher` option.")
        self.name, self.family = first.name, first.family

    def setup(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        for index in range(len(self.components), len(teachers)):
            copy = _unweighted(build_distiller({**self.spec, "teacher": index}))
            copy.dataset_size = self.dataset_size
            self.components[f"teacher{index}"] = copy
        for index, copy in enumerate(self.components.values()):
            copy.setup(student, teachers[index])

    def forward(self, student: ModelView, teachers: Sequence[ModelView], batch: Mapping[str, Any]):
        total, values = weighted_losses(self.components.items(), student, teachers, batch)
        return total / len(self.components), values

    def extra_repr(self) -> str:
        return f"weight={self.weight}, teachers={len(self.components)}"


def _unweighted(copy: Distiller) -> Distiller:
    """``copy`` with weight 1 (the weight is the :class:`EachTeacherDistiller`'s)."""
    copy.weight = 1.0
    copy.schedules.pop("weight", None)
    return copy

"""``composite``: named child distillers as one registered distiller, each with its own (schedulable) weight.

Published recipes built from the generic distillers (``tinybert``) subclass it; every child is logged as a sub-term.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..capture import ModelView
from ..schedules import Knob
from .base import CONTRACT_HOOKS, Distiller, build_distiller, ordered_union, register_distiller, weighted_losses


@register_distiller("composite")
class CompositeDistiller(Distiller):
    """Named child distillers as one: ``L = sum_c w_c(step) * L_c``, the ``w_c`` being the children's own weights.

    Logged sub-terms: ``<key>/<child>`` (the unweighted ``L_c``) and the children's own sub-terms as
    ``<key>/<child>/<part>``. Every optional hook of the contract (``base.CONTRACT_HOOKS``: setup, schedules,
    ``on_step_end``, ``on_save``, hooked features, teacher parameters, forward contexts) is served by delegating to
    the children in one loop, and ``requires`` / ``teacher_train_mode`` / ``batch_level`` / ``needs_sample_index`` are
    the children's union (``dataset_size`` is handed to every child).
    A logit child (``row_loss``) is called through its own ``forward``, which runs its chunked row pass by itself
    (normalised like the trainer's shared pass, so the value is the same). Children read the composite's teacher
    (its ``teacher`` option); multi-teacher children and children with a ``teacher`` of their own are refused.

    Args:
        components: ``{child_name: Distiller or {"name": ..., **options}}``.
        weight: Factor of ``L`` in the total loss.
    """

    family = "composite"

    def __init__(self, components: Mapping[str, Distiller | Mapping[str, Any]], weight: Knob = 1.0) -> None:
        super().__init__(weight)
        label = self.name or type(self).__name__
        if not components:
            raise ValueError(f"{label}: `components` is empty; give at least one distiller.")
        bad = [name for name in components if not name or "." in name or "/" in name]
        if bad:
            raise ValueError(f"Component names must be non-empty and contain neither '.' nor '/'; got {bad}.")
        self.components = nn.ModuleDict({name: build_distiller(spec) for name, spec in components.items()})
        for name, child in self.components.items():
            if child.multi_teacher:
                raise ValueError(f"{label}: component {name!r} ({child.name}) reads every teacher; list it beside "
                                 f"the composite in `distillers`, not inside it.")
            if child.teacher_index != 0:
                raise ValueError(f"{label}: component {name!r} sets its own `teacher`; set `teacher` on the "
                                 f"composite instead (all components read the composite's teacher).")
        children = list(self.components.values())
        self.requires = functools.reduce(operator.or_, (c.requires for c in children))
        self.teacher_train_mode = any(c.teacher_train_mode for c in children)
        self.batch_level = any(c.batch_level for c in children)
        self.needs_sample_index = any(c.needs_sample_index for c in children)

    @property
    def dataset_size(self) -> int | None:
        """The train dataset's size, set by the trainer before ``setup`` and handed to every child."""
        return next((c.dataset_size for c in self.components.values() if c.dataset_size is not None), None)

    @dataset_size.setter
    def dataset_size(self, size: int | None) -> None:
        for child in self.components.values():
            child.dataset_size = size

    def set_progress(self, step: int, max_steps: int | None) -> None:
        super().set_progress(step, max_steps)
        for child in self.components.values():
            child.set_progress(step, max_steps)

    def forward(self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any]):
        return weighted_losses(self.components.items(), student, [teacher], batch)


def _delegate(hook: str, how: str):
    """A method of :class:`CompositeDistiller` serving the contract hook ``hook`` from its children."""

    def each(self, *args, **kwargs):
        for child in self.components.values():
            getattr(child, hook)(*args, **kwargs)

    def union(self, *args, **kwargs):
        return ordered_union(getattr(child, hook)(*args, **kwargs) for child in self.components.values())

    @contextlib.contextmanager
    def nested(self, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            for child in self.components.values():
                stack.enter_context(getattr(child, hook)(*args, **kwargs))
            yield

    method = {"each": each, "union": union, "nested": nested}[how]
    method.__name__ = method.__qualname__ = hook
    method.__doc__ = f"``{hook}`` of every component ({how})."
    return method


for _hook, _how in CONTRACT_HOOKS.items():
    if _hook not in vars(CompositeDistiller):
        setattr(CompositeDistiller, _hook, _delegate(_hook, _how))

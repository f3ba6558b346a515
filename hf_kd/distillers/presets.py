"""Presets: published recipes as one registered distiller composed of the generic ones.

:class:`CompositeDistiller` holds named child distillers and adds them up, each with its own (schedulable) weight;
it logs every child as a sub-term. :class:`TinyBERTDistiller` is TinyBERT's task-specific distillation built on it.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any, Mapping

from torch import nn

from ..capture import ModelView
from ..layer_maps import LayerMapSpec
from ..projectors import ProjectorKind
from ..schedules import Schedule
from .base import CONTRACT_HOOKS, Distiller, build_distiller, ordered_union, register_distiller, weighted_losses
from .logit import KLDistiller
from .representation import AttentionDistiller, HiddenStatesDistiller

Knob = float | Schedule | Mapping[str, Any]


@register_distiller("composite")
class CompositeDistiller(Distiller):
    """Named child distillers as one: ``L = sum_c w_c(step) * L_c``, the ``w_c`` being the children's own weights.

    Logged sub-terms: ``<key>/<child>`` (the unweighted ``L_c``) and the children's own sub-terms as
    ``<key>/<child>/<part>``. Every optional hook of the contract (``base.CONTRACT_HOOKS``: setup, schedules,
    ``on_step_end``, ``on_save``, hooked features, teacher parameters, forward contexts) is served by delegating to
    the children in one loop, and ``requires`` / ``teacher_train_mode`` / ``batch_level`` are the children's union.
    A logit child (``row_loss``) is called through its own ``forward``, which runs its chunked row pass by itself
    (normalised like the trainer's shared pass, so the value is the same). Children read the composite's teacher
    (its ``teacher`` option); multi-teacher children and children with a ``teacher`` of their own are refused.

    Args:
        components: ``{child_name: Distiller or {"name": ..., **options}}``.
        weight: Factor of ``L`` in the total loss.
    """

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


@register_distiller("tinybert")
class TinyBERTDistiller(CompositeDistiller):
    """TinyBERT's task-specific distillation (Jiao et al., "TinyBERT", Findings of EMNLP 2020), from generic parts.

    ``L = L_embd + L_hidn + L_attn + L_pred`` with, for student layer ``m`` and teacher layer ``g(m)``:

    - ``embedding``: ``MSE(E_s W_e, E_t)`` on the embedding outputs (hidden state 0), with its own projector ``W_e``
      as in the paper (eq. 9; the released code reuses ``fit_dense`` = ``W_h`` for it);
    - ``hidden``: ``mean_m MSE(H_s^m W_h, H_t^{g(m)})`` with one shared projector ``W_h`` (``fit_dense``);
    - ``attention``: ``mean_m MSE(A_s^m, A_t^{g(m)})`` on the attention *probabilities*: transformers does not
      expose the pre-softmax scores TinyBERT matches (per head when the head counts agree);
    - ``prediction``: ``t^2 * KL(softmax(z_t / t) || softmax(z_s / t))`` (the ``kl`` distiller). It is TinyBERT's soft
      cross-entropy ``-sum p_t log p_s`` minus the teacher's entropy (a constant: same gradients), averaged per
      sample where the released code also divides by the number of labels.

    hf_kd conventions apply: padding is ignored and per-layer losses are averaged over layers, not summed
    (the paper's sum is ``weight`` times the student depth). ``g`` is ``layer_map`` (``uniform``: ``g(m) = m N / M``).

    Two stages (the paper's task-specific step 1 and step 2): the ``intermediate`` losses (embedding, hidden,
    attention) have weight 1 for the first ``intermediate_steps`` optimizer steps and 0 after; the ``prediction``
    loss has weight 0, then 1. The switch is a pair of schedules on the components' weights, a pure function of
    the step, so resumed runs switch at the same step. All four components are computed and logged at every step.
    ``intermediate_steps=None`` trains all four at once (one stage); ``0`` is prediction-layer distillation only.

    Args:
        temperature: ``t`` of the prediction loss (1 in the paper); number or schedule.
        intermediate_steps: Optimizer steps of stage 1, or ``None`` for a single stage.
        layer_map: Student-to-teacher map of the hidden and attention losses.
        projector: ``W_e`` and ``W_h``: ``auto`` (linear when the widths differ), ``linear``, ``mlp`` or ``none``.
        weight: Factor of ``L`` in the total loss.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        intermediate_steps: int | None = None,
        layer_map: LayerMapSpec = "uniform",
        projector: ProjectorKind = "auto",
    ) -> None:
        if intermediate_steps is not None and intermediate_steps < 0:
            raise ValueError(
                f"tinybert: `intermediate_steps` must be >= 0 (or None for one stage), got {intermediate_steps}."
            )
        stage_1, stage_2 = (1.0, 1.0) if intermediate_steps is None else (
            Schedule.jump(1.0, 0.0, intermediate_steps), Schedule.jump(0.0, 1.0, intermediate_steps))
        super().__init__(
            {
                "embedding": HiddenStatesDistiller(stage_1, layer_map={0: 0}, loss="mse", projector=projector),
                "hidden": HiddenStatesDistiller(stage_1, layer_map=layer_map, loss="mse", projector=projector),
                "attention": AttentionDistiller(stage_1, layer_map=layer_map, loss="mse"),
                "prediction": KLDistiller(stage_2, temperature=temperature),
            },
            weight,
        )
        self.intermediate_steps = intermediate_steps

    def extra_repr(self) -> str:
        return f"weight={self.weight}, intermediate_steps={self.intermediate_steps}"

"""``tinybert``: TinyBERT's task-specific distillation as a ``composite`` of the generic distillers."""

from __future__ import annotations

from ..layer_maps import LayerMapSpec
from ..projectors import ProjectorKind
from ..schedules import Knob, Schedule
from .base import register_distiller
from .composite import CompositeDistiller
from .logit import KLDistiller
from .representation import AttentionDistiller, HiddenStatesDistiller


@register_distiller("tinybert")
class TinyBERTDistiller(CompositeDistiller):
    """TinyBERT's task-specific distillation (Jiao et al., "TinyBERT", Findings of EMNLP 2020,
    https://huggingface.co/papers/1909.10351), from generic parts.

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

    family = "representation"

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

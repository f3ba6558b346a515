"""The :class:`~hf_kd.capture.ModelView` of one forward pass, built complete in one call (student and teachers).

A pass run under ``torch.inference_mode()`` (a frozen teacher) returns inference tensors, which autograd cannot save
for backward; :func:`view_of` then hands distillers ordinary copies of what they may use in differentiable losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .capture import FeatureSpec, ModelView, Task


def view_of(
    model: nn.Module,
    task: Task,
    outputs: Any,
    head_input: torch.Tensor | None,
    head: nn.Linear | None,
    *,
    features: dict[FeatureSpec, torch.Tensor],
    loss: torch.Tensor | None = None,
    copy: bool = False,
) -> ModelView:
    """The view of ``outputs`` (the ``ModelOutput`` of ``model``), with its captured ``features`` and own ``loss``.

    On the fused head path (``head_input`` given) there are no logits: the model formed none. With ``copy`` (the
    pass ran under ``torch.inference_mode()``) the hidden states, attention maps, features and ``[B, C]`` classifier
    logits are ordinary copies; a causal LM's ``[B, T, V]`` logits are handed over as they are.
    """
    logits = None if head_input is not None else getattr(outputs, "logits", None)
    hidden_states = getattr(outputs, "hidden_states", None)
    attentions = getattr(outputs, "attentions", None)
    return ModelView(
        model=model,
        task=task,
        logits=logits.clone() if copy and logits is not None and logits.dim() == 2 else logits,
        hidden_states=_copies(hidden_states) if copy else hidden_states,
        attentions=_copies(attentions) if copy else attentions,
        loss=loss,
        head_input=head_input,
        head=head,
        features={spec: value.clone() for spec, value in features.items()} if copy else features,
    )


def _copies(tensors: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    return None if tensors is None else tuple(t.clone() for t in tensors)

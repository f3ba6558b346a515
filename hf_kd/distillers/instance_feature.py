"""``instance_feature``: feature mimicking weighted per position by the teacher's attention (ICD-style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import ModelView, Requirements
from ..choices import check_choice
from ..layer_maps import LayerMapSpec
from ..normalization import batch_mean
from ..projectors import ProjectorKind
from ..schedules import Knob
from .base import register_distiller
from .representation import FeatureLoss, HiddenStatesDistiller, feature_loss, select_tokens, token_mask

Query = Literal["cls", "mean", "last"]
AttentionLayer = Literal["last", "mapped"]


@register_distiller("instance_feature")
class InstanceFeatureDistiller(HiddenStatesDistiller):
    """Feature mimicking weighted per position by the teacher's attention (generic form of ICD, Kang et al.,
    NeurIPS 2021, https://huggingface.co/papers/2110.12724, "Instance-conditional knowledge distillation for object
    detection").

    For each mapped layer pair ``(s, t)``::

        L = mean_b  sum_i w_{b,i} * loss(LN(P(h_s^s)_{b,i}), LN(h_t^t_{b,i}))
        w_b = normalise(a_b^(1/tau) * mask_b),   a_b = mean_heads A_t[b, :, q, :]

    and the distiller's loss is the mean over layer pairs. ``q`` is the query row: ``cls`` (token 0, the ViT/BERT
    class token; the default), ``last`` (last non-padding token, for causal LMs, whose token 0 sees only itself) or
    ``mean`` (the attention every position receives, averaged over non-padding queries). ``tau < 1`` sharpens the
    weights (it is ``softmax(log a / tau)`` over the non-padding positions); padding never gets weight. ``A_t`` is
    the teacher's last attention layer (``attention_layer="last"``) or that of the mapped teacher layer
    (``"mapped"``). ``LN`` is a LayerNorm without parameters over the feature dimension (``layer_norm``; ICD compares
    LayerNorm'd values); ``P`` is the projector to the teacher width.

    ICD itself weights FPN features of detectors by the attention of instance queries (ground-truth boxes) in a
    decoder trained on the teacher; here the "instance" is a query token of the teacher's own attention, so the
    method works on ViT patch tokens and text tokens alike. Reads attention maps, so both models need
    ``attn_implementation="eager"`` (the trainer checks this before training).
    """

    requires = Requirements(hidden_states=True, attentions=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "uniform",
        last_k: int = 1,
        loss: FeatureLoss = "mse",
        projector: ProjectorKind = "auto",
        projector_per_layer: bool = False,
        query: Query = "cls",
        attention_layer: AttentionLayer = "last",
        temperature: Knob = 1.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__(weight, layer_map, last_k, False, loss, "all", projector, projector_per_layer)
        self.query = check_choice("instance_feature", "query", query, Query)
        self.attention_layer = check_choice("instance_feature", "attention_layer", attention_layer, AttentionLayer)
        self.layer_norm = layer_norm
        self.temperature = self.schedulable("temperature", temperature, positive=True)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if self.attention_layer == "mapped" and 0 in self.layer_map:
            raise ValueError("instance_feature: teacher layer 0 (embeddings) has no attention map; remove it from "
                             "`layer_map` or set attention_layer='last'.")

    def position_weights(self, attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` weights from a ``[B, H, T, T]`` attention map and a ``[B, T]`` mask; each row sums to one."""
        row = select_tokens(attention.float().mean(1), mask, self.query)
        sharpened = row.clamp_min(1e-12).pow(1.0 / self.temperature) * mask
        return sharpened / sharpened.sum(-1, keepdim=True).clamp_min(1e-12)

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = token_mask(teacher.hidden_states[0], batch.get("attention_mask")).float()
        source = {t: len(teacher.attentions) if self.attention_layer == "last" else t for _, t in self.pairs()}
        weights_of = {a: self.position_weights(teacher.attentions[a - 1], mask) for a in set(source.values())}
        per_layer = {}
        for s, t in self.pairs():
            weights = weights_of[source[t]]
            hs = self.project(s, student.hidden_states[s])
            ht = teacher.hidden_states[t].to(hs.dtype)
            if self.layer_norm:
                hs, ht = F.layer_norm(hs, hs.shape[-1:]), F.layer_norm(ht, ht.shape[-1:])
            per_sample = (feature_loss(hs, ht, self.loss) * weights.to(hs.dtype)).sum(-1)  # weights sum to 1
            per_layer[f"layer_{s}"] = batch_mean(per_sample, batch)
        return self.mean_over_layers(per_layer, student.hidden_states[0].device), per_layer

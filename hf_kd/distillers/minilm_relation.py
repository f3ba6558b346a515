"""``minilm_relation``: MiniLMv2's self-attention relations (the structure between positions, not the values)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..architecture import PROJECTION_ROLES, Projection, attention_projections, find_module, module_width
from ..capture import FeatureSpec, ModelView, Requirements
from ..layer_maps import LayerMapSpec
from ..normalization import token_mean
from ..schedules import Knob
from .base import register_distiller
from .representation import LayerMappedDistiller


@register_distiller("minilm_relation")
class MiniLMRelationDistiller(LayerMappedDistiller):
    """MiniLMv2 self-attention relations (Wang et al., Findings of ACL 2021,
    https://huggingface.co/papers/2012.15828).

    For each relation type ``r`` in ``relations`` (query, key, value) the projection outputs of all heads are
    concatenated and re-split into ``num_relation_heads`` relation heads of width ``d_r``;
    ``R = softmax(X X^T / sqrt(d_r))`` per relation head, and the loss is ``sum_r KL(R_t || R_s)`` averaged over
    relation heads and over the non-padding query rows of the global batch (padding keys are masked). Because the heads
    are re-split, teacher and student head counts may differ; ``num_relation_heads`` must divide every compared width
    (default: the teacher's number of attention heads, or the largest count below it that divides every width, e.g.
    8 for a 12-head, 384-wide teacher and a 128-wide student). By default the last layers are paired
    (``layer_map="last_k"``, ``last_k=1``).

    Q/K/V are read with forward hooks on the attention projections, found from the architecture (BERT, ViT,
    Llama-family ``q_proj``..., GPT-2's fused ``c_attn``). Override with ``student_modules`` / ``teacher_modules``:
    ``{"query": "bert.encoder.layer.{index}.attention.self.query", ...}`` where ``{index}`` is the 0-based index of
    the layer in its ``ModuleList``.
    """

    family = "relation"

    requires = Requirements()

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "last_k",
        last_k: int = 1,
        relations: Sequence[str] = PROJECTION_ROLES,
        num_relation_heads: int | None = None,
        student_modules: Mapping[str, str] | None = None,
        teacher_modules: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(weight, layer_map, last_k)
        unknown = sorted(set(relations) - set(PROJECTION_ROLES))
        if unknown or not relations:
            raise ValueError(
                f"minilm_relation: `relations` must be a non-empty subset of {PROJECTION_ROLES}, got {relations}."
            )
        self.relations = tuple(relations)
        self.num_relation_heads = num_relation_heads
        self.module_templates = {"student": student_modules, "teacher": teacher_modules}
        self.projections: dict[tuple[str, int], dict[str, Projection]] = {}

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if 0 in self.layer_map:
            raise ValueError("minilm_relation: layer 0 (embeddings) has no self-attention; remove it from `layer_map`.")
        widths = []
        for role, model, layers in (("student", student, self.layer_map.keys()),
                                    ("teacher", teacher, self.layer_map.values())):
            for layer in layers:
                found = self.projections[(role, layer)] = self._projections(role, model, layer)
                widths += [(role, relation, layer, _width(model, found[relation])) for relation in self.relations]
        known = [width for *_, width in widths if width is not None]
        heads = self.num_relation_heads
        if heads is None:  # the teacher's head count, or the largest count below it that divides every width
            common = math.gcd(*known) if known else 0
            heads = next(h for h in range(teacher.config.num_attention_heads, 0, -1) if common % h == 0)
        for role, relation, layer, width in widths:
            if width is not None and width % heads:
                raise ValueError(
                    f"minilm_relation: num_relation_heads={heads} does not divide the {role}'s {relation} "
                    f"width {width} (layer {layer}). Choose num_relation_heads dividing every width."
                )
        self.num_relation_heads = heads

    def _projections(self, role: str, model: nn.Module, layer: int) -> dict[str, Projection]:
        templates = self.module_templates[role]
        if templates is None:
            return attention_projections(model, layer)
        missing = [r for r in self.relations if r not in templates]
        if missing:
            raise ValueError(f"minilm_relation: `{role}_modules` lacks paths for {missing}.")
        return {r: Projection(templates[r].format(index=layer - 1)) for r in self.relations}

    def student_features(self):
        return self._specs("student")

    def teacher_features(self):
        return self._specs("teacher")

    def _specs(self, role: str):
        return tuple(dict.fromkeys(
            FeatureSpec(found[r].path) for (owner, _), found in self.projections.items() if owner == role
            for r in self.relations
        ))

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = batch.get("attention_mask")
        per_layer, parts = {}, {}
        for s, t in self.pairs():
            for relation in self.relations:
                log_r_s = self.relation(student, self.projections[("student", s)][relation], mask)
                log_r_t = self.relation(teacher, self.projections[("teacher", t)][relation], mask)
                kl = (log_r_t.exp() * (log_r_t - log_r_s)).sum(-1)  # [B, heads, T]
                parts[f"layer_{s}/{relation}"] = token_mean(kl.mean(1), batch)
            per_layer[f"layer_{s}"] = sum(parts[f"layer_{s}/{r}"] for r in self.relations)
        device = next(iter(student.features.values())).device
        return self.mean_over_layers(per_layer, device), parts

    def relation(self, view: ModelView, projection: Projection, mask: torch.Tensor | None) -> torch.Tensor:
        """``log softmax(X X^T / sqrt(d_r))`` per relation head, ``[B, heads, T, T]``, padding keys masked."""
        x = view.features[FeatureSpec(projection.path)].float()
        if projection.part is not None:
            x = x.chunk(3, dim=-1)[projection.part]
        batch, length, width = x.shape
        x = x.view(batch, length, self.num_relation_heads, width // self.num_relation_heads).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        return scores.log_softmax(-1)


def _width(model: nn.Module, projection: Projection) -> int | None:
    width = module_width(find_module(model, projection.path), "output")
    return width // 3 if width is not None and projection.part is not None else width

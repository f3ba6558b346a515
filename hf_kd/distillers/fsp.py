"""``fsp``: the flow between layers (FSP / Gram matrices of pairs of layers) and a per-position channel-cosine term
(SKT-style structured knowledge transfer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import hidden_size, num_layers
from ..capture import ModelView, Requirements
from ..normalization import batch_mean, token_mean
from ..projectors import ProjectorKind, build_projector, project
from ..schedules import Knob
from .base import Distiller, register_distiller
from .representation import token_mask


def instance_normalised(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each channel of each sample standardised over its non-padding positions (``[B, T, D]``, ``mask`` ``[B, T]``)."""
    weights = mask.unsqueeze(-1)
    count = weights.sum(1, keepdim=True).clamp_min(1.0)
    mean = (hidden * weights).sum(1, keepdim=True) / count
    var = ((hidden - mean).pow(2) * weights).sum(1, keepdim=True) / count
    return (hidden - mean) / (var + 1e-5).sqrt() * weights


def fsp_matrix(first: torch.Tensor, second: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G[b] = F_1[b]^T F_2[b] / n_b``: ``[B, D_1, D_2]`` over the ``n_b`` non-padding positions of each sample."""
    weights = mask.unsqueeze(-1)
    return (first * weights).transpose(1, 2) @ second / weights.sum(1, keepdim=True).clamp_min(1.0)


@register_distiller("fsp")
class FSPDistiller(Distiller):
    """Structured knowledge transfer (SKT, Liu et al., ACM MM 2020, https://huggingface.co/papers/2003.10120) on
    hidden states: the FSP matrices between consecutive mapped layers (Yim et al., CVPR 2017) and, at every mapped
    layer, one minus the cosine between the student's and the teacher's channels at each position::

        L = fsp_weight * mean_pairs mean_b MSE(G_s^b, G_t^b) + cosine_weight * mean_layers mean_tokens (1 - cos)

    with ``G = F_a^T F_b / n`` over the non-padding positions of the instance-normalised (``normalize``) hidden states
    of two consecutive layers of ``layers`` (a dict ``{student_layer: teacher_layer}``, at least two entries). The
    student's hidden states are first mapped to the teacher's width by one projector per layer (``projector``), so the
    matrices have the same shape. SKT's weights: 0.5 each. Per sample and per token (not batch-level): the FSP term
    is a mean over samples, the cosine term over the global batch's non-padding tokens. Logged: ``fsp``, ``cosine``.
    """

    family = "relation"
    requires = Requirements(hidden_states=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        layers: Mapping[int, int] | None = None,
        fsp_weight: float = 0.5,
        cosine_weight: float = 0.5,
        normalize: bool = True,
        projector: ProjectorKind = "auto",
    ) -> None:
        super().__init__(weight)
        if layers is not None and len(layers) < 2:
            raise ValueError("fsp: `layers` needs at least two pairs {student_layer: teacher_layer} (an FSP matrix "
                             "relates two layers).")
        if fsp_weight < 0 or cosine_weight < 0:
            raise ValueError(f"fsp: `fsp_weight` and `cosine_weight` must be >= 0, got {fsp_weight}, {cosine_weight}.")
        self.layer_spec = None if layers is None else {int(s): int(t) for s, t in layers.items()}
        self.layers: dict[int, int] = {}
        self.fsp_weight, self.cosine_weight, self.normalize = fsp_weight, cosine_weight, normalize
        self.projector_kind = projector
        self.projectors = nn.ModuleDict()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("fsp compares the teacher's layers: pass `teacher_model=`.")
        depth_s, depth_t = num_layers(student), num_layers(teacher)
        # default: the student's last two layers against the teacher's last two
        self.layers = dict(sorted((self.layer_spec or {depth_s - 1: depth_t - 1, depth_s: depth_t}).items()))
        for s, t in self.layers.items():
            if not (0 <= s <= depth_s and 0 <= t <= depth_t):
                raise ValueError(f"fsp: `layers` entry {s} -> {t} is out of range: the student has {depth_s} layers "
                                 f"and the teacher {depth_t} (0 = embeddings).")
        width_s, width_t = hidden_size(student), hidden_size(teacher)
        self.projectors = nn.ModuleDict({str(s): build_projector(width_s, width_t, self.projector_kind)
                                         for s in self.layers})

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = token_mask(student.hidden_states[0], batch.get("attention_mask")).float()
        features_s, features_t = [], []
        for s, t in self.layers.items():
            h_s = project(self.projectors[str(s)], student.hidden_states[s]).float()
            h_t = teacher.hidden_states[t].float()
            features_s.append(instance_normalised(h_s, mask) if self.normalize else h_s)
            features_t.append(instance_normalised(h_t, mask) if self.normalize else h_t)
        fsp = torch.stack([
            batch_mean((fsp_matrix(a_s, b_s, mask) - fsp_matrix(a_t, b_t, mask)).pow(2).mean((1, 2)), batch)
            for (a_s, b_s), (a_t, b_t) in zip(zip(features_s, features_s[1:]), zip(features_t, features_t[1:]))
        ]).mean()
        cosine = torch.stack([token_mean(1.0 - F.cosine_similarity(f_s, f_t, dim=-1, eps=1e-8), batch)
                              for f_s, f_t in zip(features_s, features_t)]).mean()
        return self.fsp_weight * fsp + self.cosine_weight * cosine, {"fsp": fsp.detach(), "cosine": cosine.detach()}

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, layers={self.layer_spec}, fsp_weight={self.fsp_weight}, "
                f"cosine_weight={self.cosine_weight}")

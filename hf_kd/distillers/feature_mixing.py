"""``feature_mixing``: teacher features replace a ratio of the student's, a small decoder reconstructs the teacher's
(DPK-style)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from ..architecture import hidden_size
from ..capture import ModelView
from ..choices import check_choice
from ..layer_maps import LayerMapSpec
from ..normalization import token_mean
from ..projectors import ProjectorKind
from ..schedules import Knob
from ..step_random import StepRandom
from .base import register_distiller
from .representation import HiddenStatesDistiller, feature_loss, token_mask

Decoder = Literal["transformer", "mlp"]


@register_distiller("feature_mixing")
class FeatureMixingDistiller(HiddenStatesDistiller):
    """Dynamic prior knowledge (DPK; Qiu et al., ICLR 2023, https://huggingface.co/papers/2206.06067, "Better teacher
    better student: dynamic prior knowledge for knowledge distillation"): part of the student's features is replaced by
    the teacher's, and a small decoder reconstructs the teacher's features from the mix.

    For each mapped layer pair ``(s, t)``, with ``M_b`` a random set of ``round(ratio * n_b)`` of the ``n_b``
    non-padding positions of sample ``b`` (drawn anew for every sample, layer and step; padding never)::

        mixed_{b,i} = h_t^t_{b,i} if i in M_b else P(h_s^s)_{b,i}
        L = mean_{b, non-padding i} mean_d (D(mixed)_{b,i} - h_t^t_{b,i})^2

    averaged over layer pairs. The loss runs over *all* non-padding positions, as DPK reconstructs the whole teacher
    map: on the replaced positions the decoder learns to carry the teacher's features through, on the others the
    student (through ``P``) learns to produce what the decoder needs, helped by the teacher's features around it
    when the decoder mixes positions (``decoder="transformer"``, the default: one post-norm encoder layer with the
    teacher's head count, feed-forward width ``decoder_width``). ``decoder="mlp"`` (Linear-GELU-Linear of hidden
    width ``decoder_width``) works per position, so there the replaced positions teach the student nothing. One
    decoder per mapped layer; ``decoder_width=None`` means the teacher's width. Projector and decoders are trained
    with the student, checkpointed, and never exported.

    ``ratio`` is a number or a schedule in ``[0, 1]``: ``0`` is plain projected-feature reconstruction; ``1`` gives
    the student no gradient. DPK sets the ratio from the student-teacher CKA as training goes; that rule is
    unverified (the paper's code is not public), so it is not built in: any schedule can drive ``ratio``. In
    evaluation the masks come from ``seed`` alone, so every evaluation draws the same ones.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "uniform",
        last_k: int = 1,
        ratio: Knob = 0.5,
        decoder: Decoder = "transformer",
        decoder_width: int | None = None,
        projector: ProjectorKind = "auto",
        projector_per_layer: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, layer_map, last_k, False, "mse", "all", projector, projector_per_layer)
        self.ratio = self.schedulable("ratio", ratio, maximum=1.0)
        self.decoder_kind = check_choice("feature_mixing", "decoder", decoder, Decoder)
        self.decoder_width = decoder_width
        self.random = StepRandom(seed)
        self.decoders = nn.ModuleDict()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        self.decoders = nn.ModuleDict({str(s): self.build_decoder(teacher) for s in self.layer_map})

    def build_decoder(self, teacher: nn.Module) -> nn.Module:
        width = hidden_size(teacher)
        hidden = self.decoder_width or width
        if self.decoder_kind == "mlp":
            return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        heads = teacher.config.num_attention_heads
        return nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, batch_first=True)

    def replace_mask(self, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[B, T]`` bool: ``round(ratio * n_b)`` random non-padding positions of each row (``mask``: 1 = token)."""
        scores = torch.rand(mask.shape, generator=generator).to(mask.device).masked_fill(mask == 0, float("inf"))
        ranks = scores.argsort(-1).argsort(-1)
        count = torch.round(self.ratio * mask.sum(-1))
        return ranks < count.unsqueeze(-1)

    def decode(self, layer: int, mixed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        decoder = self.decoders[str(layer)]
        if isinstance(decoder, nn.TransformerEncoderLayer):
            return decoder(mixed, src_key_padding_mask=mask == 0)
        return decoder(mixed)

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = token_mask(student.hidden_states[0], batch.get("attention_mask"))
        generator = self.random.generator(self.global_step if student.model.training else None)
        per_layer = {}
        for s, t in self.pairs():
            hs = self.project(s, student.hidden_states[s])
            ht = teacher.hidden_states[t].to(hs.dtype)
            mixed = torch.where(self.replace_mask(mask, generator).unsqueeze(-1), ht, hs)
            reconstruction = feature_loss(self.decode(s, mixed, mask), ht, "mse")
            per_layer[f"layer_{s}"] = token_mean(reconstruction, batch)
        return self.mean_over_layers(per_layer, student.hidden_states[0].device), per_layer

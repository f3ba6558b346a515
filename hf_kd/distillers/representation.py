"""Internal-representation distillers: hidden states, attention maps, and features of named modules.

Layer maps (:mod:`hf_kd.layer_maps`) pair student and teacher layers of models of different depth; projectors
(:mod:`hf_kd.projectors`) map the student's width to the teacher's and are trained with the student, checkpointed,
and never exported. Each mapped layer is logged as a sub-term (``loss/<name>/layer_<s>``) and the loss is the mean
over the active layers, so its scale does not depend on how many layers a progressive schedule has switched on.
Token-level terms are means over the non-padding tokens of the whole global batch
(:func:`~hf_kd.normalization.token_mean`), pooled ones (``cls``, ``mean``, ``last``) means over samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import find_module, hidden_size, module_width, num_layers, patch_grid
from ..capture import FeatureSpec, ModelView, Requirements
from ..choices import check_choice, choices_of
from ..layer_maps import LayerMapSpec, resolve_layer_map
from ..normalization import batch_mean, token_mean
from ..projectors import ProjectorKind, build_projector, project
from ..schedules import Knob
from .base import Distiller, register_distiller

FeatureLoss = Literal["mse", "cosine", "smooth_l1", "pkd"]
Tokens = Literal["all", "cls", "mean", "last"]
AttentionLoss = Literal["kl", "mse"]
HeadMismatch = Literal["average", "error"]
FeatureSide = Literal["output", "input"]
_EPS = 1e-12


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, loss: FeatureLoss) -> torch.Tensor:
    """Per-position loss between features ``[..., D]``, reduced over the last dimension.

    ``mse``: ``mean_d (s - t)^2``; ``cosine``: ``1 - cos(s, t)``; ``smooth_l1``: ``mean_d smoothL1(s - t)``;
    ``pkd``: ``|| s/||s|| - t/||t|| ||^2`` (Patient KD, Sun et al., 2019).
    """
    if loss == "mse":
        return (student - teacher).pow(2).mean(-1)
    if loss == "cosine":
        return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if loss == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, reduction="none").mean(-1)
    if loss == "pkd":
        return (F.normalize(student, dim=-1, eps=1e-8) - F.normalize(teacher, dim=-1, eps=1e-8)).pow(2).sum(-1)
    raise ValueError(f"Unknown feature loss {loss!r}; choose one of {', '.join(choices_of(FeatureLoss))}.")


def token_mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]`` mask of the non-padding positions of ``hidden`` (all ones without an attention mask)."""
    if attention_mask is None:
        return hidden.new_ones(hidden.shape[:2])
    return attention_mask.to(hidden.device, hidden.dtype)


def select_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None, tokens: Tokens) -> torch.Tensor:
    """The positions a token-level loss runs over: ``all`` tokens (``[B, T, D]``; padding is left to
    :func:`~hf_kd.normalization.token_mean`), or one vector per sample (``[B, D]``): ``cls`` the first token,
    ``mean`` the mask-weighted mean over tokens, ``last`` the last non-padding token (left or right padding).
    """
    if tokens == "all":
        return hidden
    if tokens == "cls":
        return hidden[:, 0]
    mask = token_mask(hidden, attention_mask)
    if tokens == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    if tokens == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * (mask > 0)).argmax(-1)  # the largest position that is not padding
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"Unknown `tokens` {tokens!r}; choose one of {', '.join(choices_of(Tokens))}.")


def layer_tokens(view: ModelView, layer: int, attention_mask: torch.Tensor | None, tokens: Tokens) -> torch.Tensor:
    """:func:`select_tokens` of ``view``'s hidden state ``layer``, or the copy a teacher cache stored pooled that
    way (``view.pooled_hidden``)."""
    if view.pooled_hidden and tokens != "all":
        pooled = view.pooled_hidden.get((layer % len(view.hidden_states), tokens))
        if pooled is not None:
            return pooled
    return select_tokens(view.hidden_states[layer], attention_mask, tokens)


class LayerMappedDistiller(Distiller):
    """Base of distillers that compare student layer ``s`` with teacher layer ``layer_map[s]``.

    Args:
        layer_map: ``uniform``, ``skip``, ``last``, ``last_k`` or a dict ``{student_layer: teacher_layer}``.
        last_k: How many last layers ``layer_map="last_k"`` pairs.
        include_embeddings: Also pair the embedding outputs (layer 0).

    ``active_layers`` (``None``: all) restricts the loss to some student layers; progressive schedules set it.
    """

    family = "representation"

    def __init__(
        self, weight: Knob = 1.0, layer_map: LayerMapSpec = "uniform", last_k: int = 1, include_embeddings: bool = False
    ) -> None:
        super().__init__(weight)
        self.layer_map_spec = layer_map
        self.last_k = last_k
        self.include_embeddings = include_embeddings
        self.layer_map: dict[int, int] = {}
        self.active_layers: set[int] | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.layer_map = resolve_layer_map(
            self.layer_map_spec, num_layers(student), num_layers(teacher),
            last_k=self.last_k, include_embeddings=self.include_embeddings,
        )

    def pairs(self) -> list[tuple[int, int]]:
        """The (student, teacher) layer pairs the loss runs over now."""
        return [(s, t) for s, t in self.layer_map.items() if self.active_layers is None or s in self.active_layers]

    @staticmethod
    def mean_over_layers(per_layer: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The distiller's loss: the mean of the per-layer losses (zero when no layer is active)."""
        if not per_layer:
            return torch.zeros((), device=device)
        return torch.stack(list(per_layer.values())).mean()


@register_distiller("hidden_states")
class HiddenStatesDistiller(LayerMappedDistiller):
    """Match hidden states layer by layer: ``mean_layers mean_tokens loss(P(h_s^l), h_t^{map(l)})``.

    FitNets (https://huggingface.co/papers/1412.6550) / TinyBERT (https://huggingface.co/papers/1909.10351) with
    ``loss="mse"``; Patient KD (https://huggingface.co/papers/1908.09355) with
    ``loss="pkd", tokens="cls", layer_map="skip"``; Aguilar et al. (https://huggingface.co/papers/1910.03723) with
    ``loss="cosine", tokens="cls"``.

    Args:
        loss: ``mse``, ``cosine`` (1 - cos), ``smooth_l1`` or ``pkd`` (normalised MSE).
        tokens: ``all`` non-padding tokens, ``cls`` (first token), ``mean`` (mean-pooled) or ``last`` (last
            non-padding token, for causal LMs).
        projector: ``auto`` (identity when widths match, else linear), ``linear``, ``mlp`` or ``none``; one projector
            shared by all layers (TinyBERT's ``W_h``) unless ``projector_per_layer``.
    """

    requires = Requirements(hidden_states=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "uniform",
        last_k: int = 1,
        include_embeddings: bool = False,
        loss: FeatureLoss = "mse",
        tokens: Tokens = "all",
        projector: ProjectorKind = "auto",
        projector_per_layer: bool = False,
    ) -> None:
        super().__init__(weight, layer_map, last_k, include_embeddings)
        self.loss = check_choice(self.name, "loss", loss, FeatureLoss)
        self.tokens = check_choice(self.name, "tokens", tokens, Tokens)
        self.projector_kind, self.projector_per_layer = projector, projector_per_layer
        self.projectors = nn.ModuleDict()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        grids = patch_grid(student), patch_grid(teacher)
        if self.tokens == "all" and None not in grids and grids[0] != grids[1]:
            raise ValueError(
                f"{self.name}: the student has {grids[0]} patch tokens per image and the teacher {grids[1]}, so "
                f"tokens='all' cannot pair them. Use pooled tokens (tokens='cls' or 'mean'), or the same image_size "
                f"/ patch_size in both models."
            )
        widths = (hidden_size(student), hidden_size(teacher))
        keys = [str(s) for s in self.layer_map] if self.projector_per_layer else ["shared"]
        self.projectors = nn.ModuleDict({key: build_projector(*widths, self.projector_kind) for key in keys})

    def project(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return project(self.projectors[str(layer) if self.projector_per_layer else "shared"], hidden)

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = batch.get("attention_mask")
        per_layer = {}
        for s, t in self.pairs():
            hs = select_tokens(self.project(s, student.hidden_states[s]), mask, self.tokens)
            ht = layer_tokens(teacher, t, mask, self.tokens)
            per_layer[f"layer_{s}"] = batch_mean(feature_loss(hs, ht.to(hs.dtype), self.loss), batch)
        return self.mean_over_layers(per_layer, student.hidden_states[0].device), per_layer


@register_distiller("attention")
class AttentionDistiller(LayerMappedDistiller):
    """Match attention distributions layer by layer.

    ``loss="kl"``: ``mean_{heads, query rows} KL(A_t[i, :] || A_s[i, :])`` (Aguilar et al., 2020,
    https://huggingface.co/papers/1910.03723; MiniLM, https://huggingface.co/papers/2002.10957). ``loss="mse"``:
    ``mean_{heads, query rows} mean_{keys} (A_s - A_t)^2``, TinyBERT-style but on the attention *probabilities* models
    return — transformers does not expose the pre-softmax scores TinyBERT used. Padded queries and keys are ignored;
    query rows are averaged over the non-padding tokens of the global batch.

    Attention maps come only from ``attn_implementation="eager"``; the trainer raises before training, naming the
    setting, when a model uses sdpa/flash attention (switching the user's model silently would change its saved
    config). Different head counts: ``head_mismatch="average"`` compares the head-averaged maps (documented loss of
    per-head detail); ``"error"`` refuses.
    """

    requires = Requirements(attentions=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "uniform",
        last_k: int = 1,
        loss: AttentionLoss = "kl",
        head_mismatch: HeadMismatch = "average",
    ) -> None:
        super().__init__(weight, layer_map, last_k, include_embeddings=False)
        self.loss = check_choice("attention", "loss", loss, AttentionLoss)
        self.head_mismatch = check_choice("attention", "head_mismatch", head_mismatch, HeadMismatch)
        self.average_heads = False

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if 0 in self.layer_map:
            raise ValueError("attention: layer 0 (embeddings) has no attention map; remove it from `layer_map`.")
        heads = (student.config.num_attention_heads, teacher.config.num_attention_heads)
        if heads[0] != heads[1] and self.head_mismatch == "error":
            raise ValueError(
                f"attention: the student has {heads[0]} heads and the teacher {heads[1]}; per-head matching needs "
                f"equal counts. Set head_mismatch='average' to compare head-averaged maps."
            )
        self.average_heads = heads[0] != heads[1]

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        mask = batch.get("attention_mask")
        per_layer = {}
        for s, t in self.pairs():
            a_s, a_t = student.attentions[s - 1], teacher.attentions[t - 1]
            if self.average_heads:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            per_layer[f"layer_{s}"] = token_mean(attention_map_loss(a_s, a_t, mask, self.loss), batch)
        return self.mean_over_layers(per_layer, student.attentions[0].device), per_layer


def attention_map_loss(a_s: torch.Tensor, a_t: torch.Tensor, mask: torch.Tensor | None, loss: str) -> torch.Tensor:
    """Per query position ``[B, T]``, averaged over heads, from ``[B, H, T, T]`` maps: ``KL(A_t[i] || A_s[i])`` of
    each query row, or ``mean_keys (A_s - A_t)^2`` over its non-padding keys.

    Rows are renormalised in fp32 first, so maps returned in bf16/fp16 (rows summing to 1 +- 1e-3) still give a
    KL >= 0.
    """
    a_s, a_t = _rows_in_fp32(a_s), _rows_in_fp32(a_t)
    if loss == "kl":
        return (a_t * (a_t.clamp_min(_EPS).log() - a_s.clamp_min(_EPS).log())).sum(-1).clamp_min(0.0).mean(1)
    keys = a_s.new_ones(a_s.shape[-1]) if mask is None else mask[:, None, None, :].to(a_s.dtype)
    squared = ((a_s - a_t).pow(2) * keys).sum(-1) / keys.sum(-1).clamp_min(1.0)
    return squared.mean(1)


def _rows_in_fp32(attention: torch.Tensor) -> torch.Tensor:
    attention = attention.float()
    return attention / attention.sum(-1, keepdim=True).clamp_min(_EPS)


@register_distiller("feature")
class FeatureDistiller(Distiller):
    """Match the output (or input) of any named student module with a named teacher module (torchdistill-style
    forward hooks; nothing in the models changes): FitNets' hints (https://huggingface.co/papers/1412.6550) on any
    module.

    ``[B, D]`` and ``[B, T, D]`` features are compared on the last dimension (token features over non-padding
    tokens); ``[B, C, H, W]`` maps over channels at every position, the larger map average-pooled to the smaller.
    The projector (``Linear``, or a 1x1 ``Conv2d`` for 4-D maps) is sized from the hooked modules; give
    ``student_dim``/``teacher_dim`` when it cannot be read off them.
    """

    family = "representation"

    requires = Requirements()

    def __init__(
        self,
        student_module: str,
        teacher_module: str,
        weight: Knob = 1.0,
        what: FeatureSide = "output",
        loss: FeatureLoss = "mse",
        projector: ProjectorKind = "auto",
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__(weight)
        check_choice("feature", "loss", loss, FeatureLoss)
        check_choice("feature", "what", what, FeatureSide)
        self.student_spec, self.teacher_spec = FeatureSpec(student_module, what), FeatureSpec(teacher_module, what)
        self.loss, self.projector_kind = loss, projector
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.projector: nn.Module = nn.Identity()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        s_module, t_module = find_module(student, self.student_spec.path), find_module(teacher, self.teacher_spec.path)
        s_dim = self.student_dim or module_width(s_module, self.student_spec.what)
        t_dim = self.teacher_dim or module_width(t_module, self.teacher_spec.what)
        if s_dim is None or t_dim is None:
            raise ValueError(
                f"feature: cannot read the width of {self.student_spec.path!r} / {self.teacher_spec.path!r}; "
                f"pass `student_dim` and `teacher_dim`."
            )
        self.projector = build_projector(s_dim, t_dim, self.projector_kind)
        if isinstance(self.projector, nn.Linear) and isinstance(s_module, nn.Conv2d):  # channels of 4-D maps
            self.projector = nn.Conv2d(s_dim, t_dim, kernel_size=1)

    def student_features(self):
        return (self.student_spec,)

    def teacher_features(self):
        return (self.teacher_spec,)

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        f_s, f_t = student.features[self.student_spec], teacher.features[self.teacher_spec]
        spatial = f_s.dim() == 4
        if spatial:
            f_s, f_t = _match_spatial(project(self.projector, f_s), f_t)
            f_s, f_t = f_s.flatten(2).transpose(1, 2), f_t.flatten(2).transpose(1, 2)
        else:
            f_s = project(self.projector, f_s)
        values = feature_loss(f_s, f_t.to(f_s.dtype), self.loss)  # [B] or [B, positions]
        mask = batch.get("attention_mask")
        if values.dim() == 2 and (spatial or mask is None or mask.shape != values.shape):
            values = values.mean(-1)  # positions without padding (spatial maps, patch tokens): a mean per sample
        return batch_mean(values, batch)


def _match_spatial(f_s: torch.Tensor, f_t: torch.Tensor):
    size = min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1])
    return F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)

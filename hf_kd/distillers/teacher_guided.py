"""Teacher-guided distillers: the teacher decides where the student looks, fills in part of its features, or stands
in for some of its blocks.

- ``instance_feature``: feature mimicking weighted per position by the teacher's attention (ICD-style);
- ``feature_mixing``: teacher features replace a ratio of the student's, a small decoder reconstructs the teacher's
  (DPK-style);
- ``block_swap``: frozen teacher blocks randomly replace student blocks in the training forward (IAKD).

Their random draws come from :class:`StepRandom`: a pure function of ``(seed, optimizer step, draw within the
step)``, so a resumed run draws what the uninterrupted run drew, with no generator state in the checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
from functools import partial
from typing import Any, Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from ..architecture import layers_path
from ..capture import ModelView, Requirements
from ..layer_maps import LayerMapSpec
from ..normalization import batch_mean, token_mean
from ..projectors import ProjectorKind
from .base import register_distiller
from .representation import (
    FeatureLoss,
    HiddenStatesDistiller,
    Knob,
    LayerMappedDistiller,
    feature_loss,
    hidden_size,
    select_tokens,
    token_mask,
)

Query = Literal["cls", "mean", "last"]


class StepRandom:
    """Random generators that are a pure function of ``(seed, optimizer step, index of the draw within the step)``.

    ``seed=None`` takes ``torch.initial_seed()`` at the first draw: ``TrainingArguments.seed`` under the trainer,
    which seeds torch when it is built. The draws do not depend on dropout, data order or other distillers, and a
    run resumed from a checkpoint makes exactly the draws of the uninterrupted run (gradient-accumulation
    micro-batches of a step are draws 1, 2, ...).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self.step: int | None = None
        self.draws = 0

    def generator(self, step: int | None) -> torch.Generator:
        """The next draw of optimizer step ``step``; ``step=None`` (evaluation): a generator seeded from the seed alone,
        so every evaluation draws the same."""
        if self.seed is None:
            self.seed = torch.initial_seed()
        if step is None:
            return torch.Generator().manual_seed(self.seed)
        if step != self.step:
            self.step, self.draws = step, 0
        self.draws += 1
        return torch.Generator().manual_seed(hash((self.seed, step, self.draws)) % 2**63)


@register_distiller("instance_feature")
class InstanceFeatureDistiller(HiddenStatesDistiller):
    """Feature mimicking weighted per position by the teacher's attention (generic form of ICD, Kang et al.,
    NeurIPS 2021, "Instance-conditional knowledge distillation for object detection").

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
        attention_layer: Literal["last", "mapped"] = "last",
        temperature: Knob = 1.0,
        layer_norm: bool = True,
    ) -> None:
        super().__init__(weight, layer_map, last_k, False, loss, "all", projector, projector_per_layer)
        if query not in ("cls", "mean", "last"):
            raise ValueError(f"instance_feature: unknown `query` {query!r}; choose cls, mean or last.")
        if attention_layer not in ("last", "mapped"):
            raise ValueError(
                f"instance_feature: `attention_layer` must be 'last' or 'mapped', got {attention_layer!r}."
            )
        self.query, self.attention_layer, self.layer_norm = query, attention_layer, layer_norm
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


@register_distiller("feature_mixing")
class FeatureMixingDistiller(HiddenStatesDistiller):
    """Dynamic prior knowledge (DPK; Qiu et al., ICLR 2023, "Better teacher better student: dynamic prior knowledge
    for knowledge distillation"): part of the student's features is replaced by the teacher's, and a small decoder
    reconstructs the teacher's features from the mix.

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
        decoder: Literal["transformer", "mlp"] = "transformer",
        decoder_width: int | None = None,
        projector: ProjectorKind = "auto",
        projector_per_layer: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, layer_map, last_k, False, "mse", "all", projector, projector_per_layer)
        if decoder not in ("transformer", "mlp"):
            raise ValueError(f"feature_mixing: unknown `decoder` {decoder!r}; choose transformer or mlp.")
        self.ratio = self.schedulable("ratio", ratio, maximum=1.0)
        self.decoder_kind, self.decoder_width = decoder, decoder_width
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
        mask = token_mask(teacher.hidden_states[0], batch.get("attention_mask"))
        generator = self.random.generator(self.global_step if student.model.training else None)
        per_layer = {}
        for s, t in self.pairs():
            hs = self.project(s, student.hidden_states[s])
            ht = teacher.hidden_states[t].to(hs.dtype)
            mixed = torch.where(self.replace_mask(mask, generator).unsqueeze(-1), ht, hs)
            reconstruction = feature_loss(self.decode(s, mixed, mask), ht, "mse")
            per_layer[f"layer_{s}"] = token_mean(reconstruction, batch)
        return self.mean_over_layers(per_layer, student.hidden_states[0].device), per_layer


@register_distiller("block_swap")
class BlockSwapDistiller(LayerMappedDistiller):
    """Interactive KD (IAKD; Fu et al., 2020, arXiv 2007.01476, "Interactive knowledge distillation"): in the
    training forward, each mapped student block is replaced, with probability ``swap_prob`` (number or schedule),
    by the frozen teacher layers it stands for, run on the inputs the student block received::

        h^s = T_span(s)(h^{s-1})  with probability p,   else  S_s(h^{s-1})

    ``span(s)`` is the teacher layers ``map(s-1)+1 .. map(s)`` (``map(0) = 0``, the embeddings): with the default
    ``layer_map="uniform"`` a 2-layer student and a 4-layer teacher swap block 1 for teacher layers 1-2 and block 2
    for teacher layers 3-4, IAKD's "same number of blocks". When layer ``s-1`` is not mapped, ``span(s)`` is teacher
    layer ``map(s)`` alone. Gradients flow through the teacher layers to the earlier student blocks; the teacher's
    parameters stay frozen (``setup`` refuses teacher layers with trainable parameters). A swapped student block
    still runs (its output is discarded, so it gets no gradient from that step), so its attention maps and the
    student's hidden-state tuple keep their usual shapes; the hidden state a swapped block reports is the teacher
    layers' output.

    The swap changes the forward pass itself, so this distiller's own loss is zero: the hybrid network is trained by
    the trainer's hard loss and the other distillers (IAKD: CE, optionally KD). It logs ``swapped``, the fraction of
    mapped blocks swapped in the step. Nothing is swapped in evaluation, and no hook outlives the forward pass, so
    evaluation and the exported model are the plain student. Needs blocks of the same class and hidden size in both
    models, and teacher parameters in the student's dtype (leave ``teacher_dtype`` unset).

    Swaps are drawn once per forward pass from :class:`StepRandom` (``seed=None``: the trainer's seed), so a resumed
    run swaps exactly as the uninterrupted one. The paper's value and schedule of ``p`` are unverified here.
    """

    requires = Requirements()

    def __init__(
        self,
        weight: Knob = 1.0,
        layer_map: LayerMapSpec = "uniform",
        last_k: int = 1,
        swap_prob: Knob = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, layer_map, last_k)
        self.swap_prob = self.schedulable("swap_prob", swap_prob, maximum=1.0)
        self.random = StepRandom(seed)
        self.layers_path = ""
        self.spans: dict[int, list[nn.Module]] = {}  # a plain dict: teacher layers stay out of parameters/state_dict
        self.swapped_fraction = 0.0
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        widths = hidden_size(student), hidden_size(teacher)
        if widths[0] != widths[1]:
            raise ValueError(f"block_swap runs teacher layers inside the student, so both need the same hidden size; "
                             f"the student's is {widths[0]} and the teacher's {widths[1]}.")
        self.layers_path = layers_path(student)
        s_layers, t_layers = student.get_submodule(self.layers_path), teacher.get_submodule(layers_path(teacher))
        classes = type(s_layers[0]).__name__, type(t_layers[0]).__name__
        if classes[0] != classes[1]:
            raise ValueError(f"block_swap needs student and teacher blocks of the same type; the student's are "
                             f"{classes[0]} and the teacher's {classes[1]}.")
        dtypes = next(s_layers.parameters()).dtype, next(t_layers.parameters()).dtype
        if dtypes[0] != dtypes[1]:
            raise ValueError(f"block_swap runs teacher layers inside the student: the teacher's parameters are "
                             f"{dtypes[1]} and the student's {dtypes[0]}. Leave `teacher_dtype` unset (or set it to "
                             f"the student's dtype).")
        self.spans = {}
        bounds = {0: 0, **self.layer_map}
        for s, t in self.layer_map.items():
            start = bounds.get(s - 1, t - 1)
            if s == 0 or t <= start:
                raise ValueError(f"block_swap: `layer_map` entry {s} -> {t} names no teacher block to swap in "
                                 f"(layer 0 is the embeddings, and mapped teacher layers must increase with the "
                                 f"student's).")
            self.spans[s] = [t_layers[i] for i in range(start, t)]
            if any(p.requires_grad for layer in self.spans[s] for p in layer.parameters()):
                raise ValueError(f"block_swap swaps in frozen teacher layers, but teacher layers {start + 1}..{t} "
                                 f"have trainable parameters; it cannot be combined with a distiller that trains "
                                 f"them.")

    def student_forward_context(self, student: nn.Module, training: bool):
        swapped = {}
        if training and self.spans:
            draws = torch.rand(len(self.spans), generator=self.random.generator(self.global_step)).tolist()
            swapped = {s: span for (s, span), u in zip(self.spans.items(), draws) if u < self.swap_prob}
        self.swapped_fraction = len(swapped) / max(len(self.spans), 1)
        return _swap_blocks(student.get_submodule(self.layers_path), swapped)

    def forward(self, student: ModelView, teacher: ModelView | None, batch: Mapping[str, Any]):
        return self._zero.clone(), {"swapped": self._zero + self.swapped_fraction}


@contextlib.contextmanager
def _swap_blocks(layers: nn.ModuleList, swapped: dict[int, list[nn.Module]]) -> Iterator[None]:
    """Forward hooks making student layer ``s`` (1-based) return the output of the teacher layers ``swapped[s]``.

    Prepended, so transformers' own hooks (which record ``output_hidden_states``) see the swapped output."""
    handles = []
    try:
        for s, span in swapped.items():
            hook = partial(_replace_output, span)
            handles.append(layers[s - 1].register_forward_hook(hook, with_kwargs=True, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _replace_output(span: list[nn.Module], _block: nn.Module, args: tuple, kwargs: dict, _output: Any) -> Any:
    """Forward hook: the block's output becomes that of the teacher layers ``span`` on the block's arguments."""
    return run_layers(span, args, kwargs)


def run_layers(span: list[nn.Module], args: tuple, kwargs: dict) -> Any:
    """The output of the transformer layers ``span``, chained, on the arguments one layer of the model received.

    KV caches are dropped (teacher layers carry the teacher's layer indices). The layers run in an empty
    ``contextvars.Context``: transformers' hooks that record ``output_hidden_states`` / ``output_attentions`` read
    the active collector from a context variable, and the teacher layers' hooks would add to the student's outputs.
    """
    args = [None if isinstance(a, Cache) else a for a in args]
    kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
    hidden = args.pop(0) if args else kwargs.pop("hidden_states")

    def run(hidden: torch.Tensor) -> Any:
        for layer in span:
            output = layer(hidden, *args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        return output

    return contextvars.Context().run(run, hidden)

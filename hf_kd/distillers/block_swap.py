"""``block_swap``: frozen teacher blocks randomly replace student blocks in the training forward (IAKD)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ..architecture import hidden_size, layers_path, run_layers
from ..capture import ModelView, Requirements
from ..layer_maps import LayerMapSpec
from ..schedules import Knob
from ..step_random import StepRandom
from .base import register_distiller
from .representation import LayerMappedDistiller


@register_distiller("block_swap")
class BlockSwapDistiller(LayerMappedDistiller):
    """Interactive KD (IAKD; Fu et al., 2020, https://huggingface.co/papers/2007.01476, "Interactive knowledge
    distillation"): in the training forward, each mapped student block is replaced, with probability ``swap_prob``
    (number or schedule), by the frozen teacher layers it stands for, run on the inputs the student block received::

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

    Swaps are drawn once per forward pass from :class:`~hf_kd.step_random.StepRandom` (``seed=None``: the trainer's
    seed), so a resumed run swaps exactly as the uninterrupted one. The paper's value and schedule of ``p`` are
    unverified here.
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

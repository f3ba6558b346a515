"""What a forward pass exposes to the distillers.

:class:`Requirements` says which outputs a distiller reads; the trainer takes the union over all distillers and
asks the models for nothing more (no hidden states or attention maps for a logit-only run).
:class:`ModelView` is the one object a distiller reads a model's outputs from.

Token-level losses on causal LMs can skip the ``[B, T, V]`` logits altogether: :func:`capture_head_input` runs the
model up to the input of its output head (``get_output_embeddings()``), and the loss forms logits chunk by chunk
(see :mod:`hf_kd.row_loss`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn

from .architecture import Task, find_module
from .sparse_logits import SparseLogits


@dataclass(frozen=True)
class Requirements:
    """Which outputs of the student and teacher a distiller reads."""

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False
    labels: bool = False  # the distiller needs ground-truth labels in the batch
    teacher: bool = True  # the distiller needs a teacher model
    # What the labels are for, when an option asks for them: the error a batch without labels gets names it (e.g.
    # "rectify=True swaps the teacher's logits of its top class and the true class; set rectify=False").
    labels_for: str = ""

    def __or__(self, other: Requirements) -> Requirements:
        return Requirements(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self)})


@dataclass(frozen=True)
class FeatureSpec:
    """The output (or input) of a named submodule, read with a forward hook (torchdistill-style).

    ``path`` is the dotted name from ``model.named_modules()``, e.g. ``"bert.encoder.layer.1.output"``.
    """

    path: str
    what: Literal["output", "input"] = "output"


@dataclass
class ModelView:
    """The outputs of one model on one batch, as distillers read them.

    ``logits`` is ``[B, C]`` for classifiers and ``[B, T, V]`` for causal LMs. On the fused causal-LM path
    ``logits`` is ``None`` and ``head_input`` (``[B, T, H]``) plus ``head`` stand in for it; a teacher read from a
    top-k cache has ``sparse_logits`` (``[B, T, k]``) instead. ``hidden_states`` and
    ``attentions`` are filled only when some distiller requires them; ``features`` holds the hooked module
    outputs that distillers asked for (see :class:`FeatureSpec`). A cached teacher's ``pooled_hidden`` holds, by
    ``(layer, pooling)``, hidden states the cache stored pooled (``[B, H]``); distillers read them through
    :func:`~hf_kd.distillers.representation.layer_tokens`. Teacher tensors carry no autograd history.
    """

    model: nn.Module
    task: Task
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    loss: torch.Tensor | None = None
    head_input: torch.Tensor | None = None
    head: nn.Linear | None = None
    features: dict[FeatureSpec, torch.Tensor] = field(default_factory=dict)
    sparse_logits: SparseLogits | None = None
    pooled_hidden: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_outputs(
        cls,
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
        """The complete view of ``outputs`` (the ``ModelOutput`` of ``model``), with its captured ``features`` and own
        ``loss``, built in one call.

        On the fused head path (``head_input`` given) there are no logits: the model formed none. A pass run under
        ``torch.inference_mode()`` (a frozen teacher) returns inference tensors, which autograd cannot save for
        backward: with ``copy`` the hidden states, attention maps, features and ``[B, C]`` classifier logits are
        ordinary copies (a causal LM's ``[B, T, V]`` logits, read only without gradient, are handed over as they are).
        """
        logits = None if head_input is not None else getattr(outputs, "logits", None)
        hidden_states = getattr(outputs, "hidden_states", None)
        attentions = getattr(outputs, "attentions", None)
        return cls(
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

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def class_logits(self, role: str, method: str) -> torch.Tensor:
        """The ``[B, C]`` classifier logits in fp32, or an error naming ``method`` and ``role`` (``"student"``,
        ``"teacher"``, ``"peer"``) for methods that work on classifiers only."""
        logits = self.logits
        if logits is None or logits.dim() != 2:
            shape = None if logits is None else tuple(logits.shape)
            raise ValueError(
                f"{method} works on classifier logits [batch, classes]; the {role} gave logits of shape {shape}. Use "
                "it with sequence/image classification models."
            )
        return logits.float()

    def detached(self) -> ModelView:
        """The same outputs without autograd history (what a distiller that trains nothing of this model reads)."""
        return self._mapped(torch.Tensor.detach)

    def to(self, device: torch.device) -> ModelView:
        """The same outputs on ``device`` (a teacher kept on another device: its outputs where the student is)."""
        return self._mapped(lambda tensor: tensor.to(device))

    def _mapped(self, function) -> ModelView:
        def each(value):
            if isinstance(value, torch.Tensor):
                return function(value)
            if isinstance(value, CachedLayers):
                return CachedLayers((each(v) for v in value), value.missing)
            return tuple(each(v) for v in value) if isinstance(value, tuple) else value

        return replace(
            self, logits=each(self.logits), hidden_states=each(self.hidden_states), attentions=each(self.attentions),
            loss=each(self.loss), head_input=each(self.head_input),
            features={spec: each(value) for spec, value in self.features.items()},
            pooled_hidden={key: each(value) for key, value in self.pooled_hidden.items()},
        )


class CachedLayers(tuple):
    """The ``hidden_states`` of a teacher read from a cache: the layers it stored, ``None`` for the others, and
    reading one of those is an error that says what the cache holds and how to rebuild it (``missing``)."""

    missing: str

    def __new__(cls, entries, missing: str) -> CachedLayers:
        layers = super().__new__(cls, entries)
        layers.missing = missing
        return layers

    def __getitem__(self, index):
        value = super().__getitem__(index)
        if value is None:
            raise ValueError(self.missing.format(layer=index))
        return value


def _copies(tensors: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
    return None if tensors is None else tuple(t.clone() for t in tensors)


@contextlib.contextmanager
def capture_head_input(head: nn.Module, skip_logits: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of ``head`` in ``captured["input"]`` (``[B, T, H]``).

    With ``skip_logits`` the head is handed an empty sequence, so the model never forms full logits (its returned
    logits are ``[B, 0, V]``).
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        captured["input"] = hidden
        return (hidden.narrow(-2, 0, 0), *args[1:]) if skip_logits else None

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def capture_features(model: nn.Module, specs: Iterable[FeatureSpec]) -> Iterator[dict[FeatureSpec, torch.Tensor]]:
    """Record the outputs/inputs of the modules named in ``specs`` during the forward passes inside the block.

    Hooks exist only inside the ``with`` block, so nothing leaks into evaluation or the saved model.
    """
    captured: dict[FeatureSpec, torch.Tensor] = {}
    handles = []
    try:
        for spec in specs:
            module = find_module(model, spec.path)
            if spec.what == "output":
                def record_output(_module, _args, output, spec=spec):
                    captured[spec] = output[0] if isinstance(output, (tuple, list)) else output
                handles.append(module.register_forward_hook(record_output))
            else:
                def record_input(_module, args, kwargs, spec=spec):
                    captured[spec] = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
                handles.append(module.register_forward_pre_hook(record_input, with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()

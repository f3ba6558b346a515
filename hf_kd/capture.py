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
import inspect
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator, Literal, Mapping

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

Task = Literal["causal_lm", "classification", "other"]

# Batch keys that are not model inputs: the trainer's labels and its token count.
NOT_MODEL_INPUTS = ("labels", "num_items_in_batch")

# Config attributes that post-process logits after the output head; the fused head path cannot reproduce them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class Requirements:
    """Which outputs of the student and teacher a distiller reads."""

    logits: bool = False
    hidden_states: bool = False
    attentions: bool = False
    labels: bool = False  # the distiller needs ground-truth labels in the batch
    teacher: bool = True  # the distiller needs a teacher model

    def __or__(self, other: "Requirements") -> "Requirements":
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
    ``logits`` is ``None`` and ``head_input`` (``[B, T, H]``) plus ``head`` stand in for it. ``hidden_states`` and
    ``attentions`` are filled only when some distiller requires them; ``features`` holds the hooked module
    outputs that distillers asked for (see :class:`FeatureSpec`). Teacher tensors carry no autograd history.
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

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def detached(self) -> "ModelView":
        """The same outputs without autograd history (what a distiller that trains nothing of this model reads)."""
        def cut(value):
            if isinstance(value, torch.Tensor):
                return value.detach()
            return tuple(cut(v) for v in value) if isinstance(value, tuple) else value

        return replace(
            self, logits=cut(self.logits), hidden_states=cut(self.hidden_states), attentions=cut(self.attentions),
            loss=cut(self.loss), head_input=cut(self.head_input),
            features={spec: cut(value) for spec, value in self.features.items()},
        )


def model_inputs(batch, model: nn.Module | None = None) -> dict:
    """What a model's forward receives of ``batch``: everything but labels and the trainer's token count, and with
    ``model`` only the inputs its ``forward`` accepts (a DistilBERT student beside a BERT teacher gets no
    ``token_type_ids``)."""
    accepts = accepted_inputs(model) if model is not None else (lambda key: key not in NOT_MODEL_INPUTS)
    return {key: value for key, value in batch.items() if accepts(key)}


def accepted_inputs(model: nn.Module):
    """A predicate on batch keys: those ``model.forward`` takes (all but labels when it takes ``**kwargs``)."""
    params = inspect.signature(unwrap(model).forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return lambda key: key not in NOT_MODEL_INPUTS
    return lambda key: key in params and key not in NOT_MODEL_INPUTS


def unwrap(model: nn.Module) -> nn.Module:
    """The bare transformers model under DDP/compile/peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, DataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
            model = model.get_base_model()
        else:
            return model


def task_of(model: nn.Module) -> Task:
    """Classify a transformers model by its head: causal LM, classifier, or anything else. The class and its bases
    are looked up in transformers' auto mappings, so subclasses of e.g. ``LlamaForCausalLM`` count too."""
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    classifiers = _class_names(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) | _class_names(
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    )
    for klass in type(unwrap(model)).__mro__:
        name = klass.__name__
        if name in causal:
            return "causal_lm"
        if name in classifiers or name.endswith(("ForSequenceClassification", "ForImageClassification")):
            return "classification"
    return "other"


def _class_names(mapping: Mapping[str, str | tuple[str, ...]]) -> set[str]:
    """The class names of a transformers auto mapping, whose values are a name or a tuple of names (e.g. DeiT's
    ``("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")``)."""
    return {name for value in mapping.values() for name in ((value,) if isinstance(value, str) else value)}


def output_head(model: nn.Module) -> nn.Linear | None:
    """The linear output head of a causal LM when logits are exactly ``head(hidden)``, else ``None``."""
    model = unwrap(model)
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POSTPROCESSING):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Linear) else None


def learned_positions(model: nn.Module) -> int | None:
    """``max_position_embeddings`` when the model has a learned position table of that size (BERT, GPT-2, ...),
    whose lookup fails past it; ``None`` for rotary / relative positions (Llama) or no positions at all."""
    limit = getattr(getattr(unwrap(model), "config", None), "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    found = any(isinstance(m, nn.Embedding) and m.num_embeddings == limit and ("position" in name or
                                                                           name.endswith("wpe"))
                for name, m in unwrap(model).named_modules())
    return limit if found else None


def logits_width(model: nn.Module) -> int | None:
    """Size of the last logits dimension: vocabulary rows of the LM head, or ``num_labels`` of a classifier."""
    head = output_head(model)
    if head is not None:
        return head.out_features
    config = getattr(unwrap(model), "config", None)
    if task_of(model) == "classification":
        return getattr(config, "num_labels", None)
    return getattr(config, "vocab_size", None)


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


def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the model's modules of the same kind of name."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        leaf = path.rsplit(".", 1)[-1]
        similar = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == leaf][:8]
        hint = f" Modules with that name: {similar}." if similar else ""
        raise ValueError(f"{type(model).__name__} has no submodule {path!r}.{hint}") from None


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

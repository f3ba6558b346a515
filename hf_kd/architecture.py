"""The anatomy of a transformers model, read from its classes, config and module names: what kind of model it is
(:func:`task_of`), what its ``forward`` takes, its depth and widths, its output head, its list of layers and the
attention projections of a layer; running a span of its layers on the arguments one layer received; and a copy of a
model with fewer layers.

Resolved from module names, so BERT-family, ViT, Llama-family and GPT-2 models work without per-model tables;
every distiller that uses these also takes explicit module paths to override them. This module imports nothing
from the rest of the package.
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import Cache, PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

Task = Literal["causal_lm", "classification", "other"]
HeadKind = Literal["pooler", "cls_norm", "last_token"]

# The column holding each sample's position in the train dataset, added for distillers that ask for it
# (``Distiller.needs_sample_index``; see hf_kd.sample_index).
SAMPLE_INDEX = "hf_kd_index"

# Batch keys that are not model inputs: the trainer's labels, its token count and its sample index.
NOT_MODEL_INPUTS = ("labels", "num_items_in_batch", SAMPLE_INDEX)

# Config attributes that post-process logits after the output head; the fused head path cannot reproduce them.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")

# Leaf names of separate query/key/value projections, and of fused ones whose output is [q | k | v].
_PROJECTIONS = {"query": ("query", "q_proj", "q_lin"), "key": ("key", "k_proj", "k_lin"),
                "value": ("value", "v_proj", "v_lin")}
_FUSED = ("c_attn", "qkv", "Wqkv")
PROJECTION_ROLES = ("query", "key", "value")


# ---- what the model is and what it takes ----------------------------------------------------------------------
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



# ---- depth, widths and head -------------------------------------------------------------------------------
def num_layers(model: nn.Module) -> int:
    """Depth of a transformers model, from its config."""
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        depth = getattr(config, name, None)
        if isinstance(depth, int):
            return depth
    raise ValueError(f"Cannot read the number of layers of {type(model).__name__} from its config.")


def hidden_size(model: nn.Module) -> int:
    """Width of the model's hidden states, from its config."""
    return int(model.config.hidden_size)


def module_width(module: nn.Module, what: str) -> int | None:
    """Feature width a module produces (``output``) or takes (``input``), read from its layers."""
    leaves = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding))]
    if not leaves:
        return None
    leaf = leaves[0] if what == "input" else leaves[-1]
    if isinstance(leaf, nn.Linear):
        return leaf.in_features if what == "input" else leaf.out_features
    if isinstance(leaf, nn.Conv2d):
        return leaf.in_channels if what == "input" else leaf.out_channels
    if isinstance(leaf, nn.LayerNorm):
        return leaf.normalized_shape[-1]
    return None if what == "input" else leaf.embedding_dim


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


def classifier_head(model: nn.Module) -> tuple[HeadKind, dict[str, nn.Module]] | None:
    """The modules between the last transformer block and the logits of a classifier, and how they are chained;
    ``None`` when the model is not a classifier with one of these heads:

    - ``pooler`` (BERT family): ``classifier(dropout(pooler(h)))``, the pooler reading the first token;
    - ``cls_norm`` (ViT): ``classifier(layernorm(h)[:, 0])``;
    - ``last_token`` (Llama-family ``*ForSequenceClassification``): ``score(norm(h))`` at the last non-padding token.
    """
    base = getattr(model, "base_model", None)
    if task_of(model) != "classification" or base is None or base is model:
        return None
    classifier, score = getattr(model, "classifier", None), getattr(model, "score", None)
    pooler, dropout = getattr(base, "pooler", None), getattr(model, "dropout", None)
    layernorm, norm = getattr(base, "layernorm", None), getattr(base, "norm", None)
    if isinstance(classifier, nn.Linear) and isinstance(pooler, nn.Module) and isinstance(dropout, nn.Module) \
            and layernorm is None and norm is None:
        return "pooler", {"pooler": pooler, "dropout": dropout, "classifier": classifier}
    if isinstance(classifier, nn.Linear) and isinstance(layernorm, nn.Module) and pooler is None:
        return "cls_norm", {"norm": layernorm, "classifier": classifier}
    if isinstance(score, nn.Linear) and isinstance(norm, nn.Module):
        return "last_token", {"norm": norm, "score": score}
    return None


def patch_grid(model: nn.Module) -> int | None:
    """Patch tokens per image of a vision transformer (``(image_size / patch_size)^2``), ``None`` for other models."""
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    image = image if isinstance(image, (tuple, list)) else (image, image)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return (image[0] // patch[0]) * (image[1] // patch[1])


# ---- modules by name ---------------------------------------------------------------------------------------
def find_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the model's modules of the same kind of name."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        leaf = path.rsplit(".", 1)[-1]
        similar = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] == leaf][:8]
        hint = f" Modules with that name: {similar}." if similar else ""
        raise ValueError(f"{type(model).__name__} has no submodule {path!r}.{hint}") from None


@dataclass(frozen=True)
class Projection:
    """A projection's output, at module ``path``; ``part`` picks the query/key/value third of a fused projection."""

    path: str
    part: int | None = None


def layers_path(model: nn.Module) -> str:
    """Dotted path of the ``nn.ModuleList`` holding the model's transformer layers."""
    depth = num_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return name
    raise ValueError(f"Cannot find the list of {depth} layers in {type(model).__name__}; pass module paths explicitly.")


def attention_projections(model: nn.Module, layer: int) -> dict[str, Projection]:
    """The query/key/value projections of transformer layer ``layer`` (1-based, as in hidden states)."""
    prefix = f"{layers_path(model)}.{layer - 1}."
    names = {name[len(prefix):]: module for name, module in model.named_modules() if name.startswith(prefix)}
    found: dict[str, Projection] = {}
    for role, leaves in _PROJECTIONS.items():
        match = next((n for n in names if n.rsplit(".", 1)[-1] in leaves and isinstance(names[n], nn.Module)), None)
        if match is not None:
            found[role] = Projection(prefix + match)
    if len(found) < 3:
        fused = next((n for n in names if n.rsplit(".", 1)[-1] in _FUSED), None)
        if fused is None:
            raise ValueError(
                f"Cannot find the query/key/value projections of layer {layer} in {type(model).__name__}; pass "
                f"`student_modules`/`teacher_modules` paths explicitly."
            )
        found = {role: Projection(prefix + fused, part) for part, role in enumerate(PROJECTION_ROLES)}
    return found


# ---- layers -----------------------------------------------------------------------------------------------
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


def truncated_copy(model: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A new model of ``model``'s class keeping only its transformer ``layers`` (in that order, renumbered
    ``0..k-1``) and every other weight (embeddings, norms, head): a student initialised from its teacher, e.g. the
    first ``k`` layers or every other one."""
    depth = num_layers(model)
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ValueError(f"Layers to keep must be a non-empty list of indices of {type(model).__name__}'s {depth} "
                         f"layers, got {list(layers)}.")
    path = layers_path(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    copy_ = type(model)(config)
    renumber = {old: new for new, old in enumerate(layers)}
    pattern = re.compile(rf"^{re.escape(path)}\.(\d+)\.")
    state = {}
    for key, value in model.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match.group(1)) in renumber:
            state[f"{path}.{renumber[int(match.group(1))]}.{key[match.end():]}"] = value
    copy_.load_state_dict(state)
    return copy_

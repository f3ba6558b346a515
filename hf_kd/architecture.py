"""Where things live inside a transformers model: its list of layers and the attention projections of a layer;
and a copy of a model with fewer layers.

Resolved from module names, so BERT-family, ViT, Llama-family and GPT-2 models work without per-model tables;
every distiller that uses these also takes explicit module paths to override them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn
from transformers import PreTrainedModel

from .capture import FeatureSpec
from .layer_maps import num_layers

# Leaf names of separate query/key/value projections, and of fused ones whose output is [q | k | v].
_PROJECTIONS = {"query": ("query", "q_proj", "q_lin"), "key": ("key", "k_proj", "k_lin"),
                "value": ("value", "v_proj", "v_lin")}
_FUSED = ("c_attn", "qkv", "Wqkv")
_ROLES = ("query", "key", "value")


@dataclass(frozen=True)
class Projection:
    """A hooked projection output; ``part`` picks the query/key/value third of a fused projection."""

    spec: FeatureSpec
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
            found[role] = Projection(FeatureSpec(prefix + match))
    if len(found) < 3:
        fused = next((n for n in names if n.rsplit(".", 1)[-1] in _FUSED), None)
        if fused is None:
            raise ValueError(
                f"Cannot find the query/key/value projections of layer {layer} in {type(model).__name__}; pass "
                f"`student_modules`/`teacher_modules` paths explicitly."
            )
        found = {role: Projection(FeatureSpec(prefix + fused), part) for part, role in enumerate(_ROLES)}
    return found


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


def patch_grid(model: nn.Module) -> int | None:
    """Patch tokens per image of a vision transformer (``(image_size / patch_size)^2``), ``None`` for other models."""
    config = getattr(model, "config", None)
    image, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image is None or patch is None:
        return None
    image = image if isinstance(image, (tuple, list)) else (image, image)
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return (image[0] // patch[0]) * (image[1] // patch[1])

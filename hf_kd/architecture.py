"""Where things live inside a transformers model: its list of layers and the attention projections of a layer.

Resolved from module names, so BERT-family, ViT, Llama-family and GPT-2 models work without per-model tables;
every distiller that uses these also takes explicit module paths to override them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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

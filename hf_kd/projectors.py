"""Learned maps from student features to the teacher's width.

A projector lives in its distiller (trained in the distillers' param group, checkpointed, never exported). It is
sized from the two models' configs in ``setup()``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .choices import check_choice

ProjectorKind = Literal["auto", "linear", "mlp", "none"]


def build_projector(in_features: int, out_features: int, kind: ProjectorKind = "auto") -> nn.Module:
    """``auto``: identity when the widths match, else ``linear``; ``linear``: ``W x + b`` (FitNets' regressor);
    ``mlp``: Linear-GELU-Linear with a hidden width of ``out_features``; ``none``: identity, only valid when the
    widths already match."""
    check_choice("projector", "kind", kind, ProjectorKind)
    if kind == "auto":
        kind = "none" if in_features == out_features else "linear"
    if kind == "none":
        if in_features != out_features:
            raise ValueError(
                f"Student width {in_features} and teacher width {out_features} differ and `projector='none'`: "
                f"set `projector='linear'` (or 'mlp') to learn a map between them."
            )
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def project(projector: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``projector(features)`` in the projector's own dtype: an fp32 projector on a bf16 / fp16 student computes in
    fp32 (gradients flow back through the cast), instead of failing in ``F.linear`` on mixed dtypes."""
    param = next(projector.parameters(), None)
    return projector(features if param is None else features.to(param.dtype))

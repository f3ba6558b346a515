"""``topology``: hierarchical topology distillation (HTD): the teacher's embeddings grouped, the student taught the
cosine topology within groups and between group prototypes and samples, and to reconstruct the teacher through
group-wise experts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import ModelView
from ..schedules import Knob
from ..step_random import StepRandom
from .base import register_distiller
from .relation import RelationDistiller


def cosine_matrix(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise cosines ``[len(x), len(y)]`` (``y = x`` by default)."""
    x = F.normalize(x, dim=-1, eps=1e-8)
    return x @ (x if y is None else F.normalize(y, dim=-1, eps=1e-8)).t()


def topology_loss(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor | None, num_groups: int):
    """Entity level: ``mean (cos_s(i, j) - cos_t(i, j))^2`` over the pairs in one group (every pair when ``groups``
    is None: the full topology); group level: ``mean (cos_s(p_k, e_i) - cos_t(p_k, e_i))^2`` between each group's
    prototype (its mean, without autograd) and every sample."""
    same = torch.ones(len(student), len(student), dtype=torch.bool, device=student.device)
    if groups is not None:
        same = groups.unsqueeze(0) == groups.unsqueeze(1)
    entity = (cosine_matrix(student) - cosine_matrix(teacher)).pow(2)[same].mean()
    if groups is None:
        return entity, entity.new_zeros(())
    present = groups.unique()
    with torch.no_grad():
        one_hot = F.one_hot(groups, num_groups).to(student.dtype)[:, present]  # [B, G present]
        counts = one_hot.sum(0, keepdim=True)
        prototypes_s = (one_hot.t() @ student) / counts.t()
        prototypes_t = (one_hot.t() @ teacher) / counts.t()
    group = (cosine_matrix(prototypes_s, student) - cosine_matrix(prototypes_t, teacher)).pow(2).mean()
    return entity, group


@register_distiller("topology")
class TopologyDistiller(RelationDistiller):
    """Hierarchical topology distillation (HTD, Kang et al., KDD 2021, https://huggingface.co/papers/2106.08700)::

        v(e_t) = softmax(W e_t)                       group assignment over K groups
        z      = gumbel_softmax(log v, T, hard)       one group per sample (straight-through)
        L_GA   = mean_b || e_t - sum_k z_k f_k(e_s) ||^2 / D_t      group-wise experts f_k: D_s -> D_t
        L_TD   = group_weight * L_group + (1 - group_weight) * L_entity      (argmax groups)
        L      = alpha * L_TD + (1 - alpha) * L_GA

    ``L_entity`` matches the cosines of same-group pairs, ``L_group`` the cosines between each group's prototype
    (its mean, without autograd) and every sample (:func:`topology_loss`). ``hierarchical=False`` is the full
    topology variant: every pair, no groups, no experts (``L = L_entity``). The assignment ``W`` and the experts
    (one Linear each) train with the student, are checkpointed and never exported. HTD's K=30 suits batches of 1024;
    the default here is 4 for batches of tens. The Gumbel draws come from :class:`~hf_kd.step_random.StepRandom`, so
    a resumed run draws what the uninterrupted one drew. The term is batch-level (relations within a micro-batch,
    weighted by its share). Logged: ``entity``, ``group``, ``assignment``.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        embedding: str | Mapping[str, str] = "cls",
        layer: int = -1,
        num_groups: int = 4,
        alpha: float = 0.5,
        group_weight: float = 0.5,
        gumbel_temperature: float = 1.0,
        hierarchical: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, embedding, layer)
        if num_groups < 1:
            raise ValueError(f"topology: `num_groups` must be >= 1, got {num_groups}.")
        for option, value in (("alpha", alpha), ("group_weight", group_weight)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"topology: `{option}` must lie in [0, 1], got {value}.")
        if gumbel_temperature <= 0:
            raise ValueError(f"topology: `gumbel_temperature` must be > 0, got {gumbel_temperature}.")
        self.num_groups, self.alpha, self.group_weight = num_groups, alpha, group_weight
        self.gumbel_temperature, self.hierarchical = gumbel_temperature, hierarchical
        self.random = StepRandom(seed)
        self.assignment: nn.Module = nn.Identity()
        self.experts = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if self.hierarchical:
            width_s, width_t = self.width(student, "student"), self.width(teacher, "teacher")
            self.assignment = nn.Linear(width_t, self.num_groups)
            self.experts = nn.ModuleList(nn.Linear(width_s, width_t) for _ in range(self.num_groups))

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        e_s = self.embeddings(student, batch, "student")
        with torch.no_grad():
            e_t = self.embeddings(teacher, batch, "teacher")
        if not self.hierarchical:
            entity, _ = topology_loss(e_s, e_t, None, 1)
            return entity, {"entity": entity.detach()}
        logits = self.assignment(e_t).float()
        generator = self.random.generator(self.global_step if student.model.training else None)
        uniform = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-10, 1.0 - 1e-10)
        soft = ((logits.log_softmax(-1) - torch.log(-torch.log(uniform))) / self.gumbel_temperature).softmax(-1)
        groups = soft.argmax(-1)
        z = F.one_hot(groups, self.num_groups).float() - soft.detach() + soft  # straight-through one-hot
        reconstruction = torch.stack([expert(e_s) for expert in self.experts], 1)  # [B, K, D_t]
        assignment = (e_t - (z.unsqueeze(-1) * reconstruction).sum(1)).pow(2).mean(-1).mean()
        entity, group = topology_loss(e_s, e_t, logits.argmax(-1), self.num_groups)
        distillation = self.group_weight * group + (1.0 - self.group_weight) * entity
        loss = self.alpha * distillation + (1.0 - self.alpha) * assignment
        return loss, {"entity": entity.detach(), "group": group.detach(), "assignment": assignment.detach()}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_groups={self.num_groups}, alpha={self.alpha}, "
                f"hierarchical={self.hierarchical}")

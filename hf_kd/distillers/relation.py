"""Relation distillers: the structure between the samples of a batch (distances, angles, similarities), not the
values of their embeddings.

Every relation distiller reads one embedding per sample through the same mechanism, :class:`RelationDistiller`:
``embedding`` is ``cls`` (the first token), ``mean`` (the mean over non-padding tokens), ``last_token`` (the last
non-padding token, left or right padding), ``pooler`` (the model's pooler output), ``logits`` (classifier logits, or a
causal LM's logits at its last token), or a dotted module path (its output read by the feature hooks; ``[B, T, D]``
outputs are averaged over non-padding tokens, others flattened per sample); ``layer`` picks the hidden state
(default ``-1``, the last). Teacher and student widths may differ: the relations are ``B x B`` (or ``B x B x B``)
either way.

**Normalisation.** A relation is defined on the samples of one micro-batch, so these distillers are
``batch_level``: each returns its loss on the micro-batch, and the trainer weights it by the micro-batch's share of
the optimizer step's global batch. With gradient accumulation or several processes the relations are those within
each micro-batch (as in every reference implementation, which sees one batch at a time).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import find_module, hidden_size, logits_width, module_width, num_layers
from ..capture import FeatureSpec, ModelView, Requirements
from ..schedules import Knob
from .base import Distiller, register_distiller
from .representation import layer_tokens, select_tokens

POOLED = {"cls": "cls", "mean": "mean", "last_token": "last"}  # embedding -> select_tokens' name
_EPS = 1e-7


class RelationDistiller(Distiller):
    """Base of the relation distillers: one embedding per sample of the student and of the teacher.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        embedding: ``cls``, ``mean``, ``last_token``, ``pooler``, ``logits`` or a dotted module path (the same path in
            both models, or a dict ``{"student": path, "teacher": path}``).
        layer: The hidden state the pooled embeddings come from (``-1``: the last; ``0``: the embeddings output).
    """

    family = "relation"
    batch_level = True

    def __init__(self, weight: Knob = 1.0, embedding: str | Mapping[str, str] = "cls", layer: int = -1) -> None:
        super().__init__(weight)
        if isinstance(embedding, Mapping):
            if set(embedding) != {"student", "teacher"}:
                raise ValueError(f"{self.name}: an `embedding` dict names both modules, {{'student': path, 'teacher': "
                                 f"path}}; got keys {sorted(embedding)}.")
            paths = dict(embedding)
        elif isinstance(embedding, str) and embedding:
            paths = {} if embedding in (*POOLED, "pooler", "logits") else {"student": embedding, "teacher": embedding}
        else:
            raise ValueError(f"{self.name}: `embedding` is one of {', '.join([*POOLED, 'pooler', 'logits'])} or a "
                             f"dotted module path; got {embedding!r}.")
        self.embedding, self.layer = embedding, layer
        self.specs: dict[str, FeatureSpec] = {role: FeatureSpec(path) for role, path in paths.items()}
        self.requires = Requirements(hidden_states=embedding in POOLED, logits=embedding == "logits")

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError(f"{self.name} relates the teacher's embeddings: pass `teacher_model=`.")
        if self.embedding == "pooler":
            self.specs = {role: FeatureSpec(_pooler_path(model, self.name, role))
                          for role, model in (("student", student), ("teacher", teacher))}
        for role, model in (("student", student), ("teacher", teacher)):
            if self.embedding in POOLED and not -num_layers(model) - 1 <= self.layer <= num_layers(model):
                raise ValueError(f"{self.name}: `layer`={self.layer} is not a hidden state of the {role} "
                                 f"({num_layers(model)} layers: 0..{num_layers(model)}, or negative from the end).")
            if role in self.specs:
                find_module(model, self.specs[role].path)  # a wrong path is named now, not in the first step

    def width(self, model: nn.Module, role: str) -> int | None:
        """The width of ``role``'s embeddings (for methods that project one onto the other)."""
        if self.embedding in POOLED:
            return hidden_size(model)
        if self.embedding == "logits":
            return logits_width(model)
        return module_width(find_module(model, self.specs[role].path), self.specs[role].what)

    def student_features(self):
        return (self.specs["student"],) if "student" in self.specs else ()

    def teacher_features(self):
        return (self.specs["teacher"],) if "teacher" in self.specs else ()

    def embeddings(self, view: ModelView, batch: Mapping[str, Any], role: str) -> torch.Tensor:
        """``[B, D]`` fp32 embeddings of ``view``'s samples."""
        mask = batch.get("attention_mask")
        if self.embedding in POOLED:
            return layer_tokens(view, self.layer, mask, POOLED[self.embedding]).float()
        if self.embedding == "logits":
            logits = view.logits
            if logits is None:
                raise ValueError(f"{self.name}: embedding='logits' needs the {role}'s logits; set "
                                 f"fused_lm_loss=False for causal LMs.")
            return (select_tokens(logits, mask, "last") if logits.dim() == 3 else logits).float()
        feature = view.features[self.specs[role]]
        if feature.dim() == 3:
            return select_tokens(feature, mask if mask is not None and mask.shape[1] == feature.shape[1] else None,
                                 "mean").float()
        return feature.flatten(1).float()

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        e_s = self.embeddings(student, batch, "student")
        with torch.no_grad():  # the teacher side is a target
            e_t = self.embeddings(teacher, batch, "teacher")
        return self.relation_loss(e_s, e_t)

    def relation_loss(self, student: torch.Tensor, teacher: torch.Tensor):
        """The loss from ``[B, D_s]`` student and ``[B, D_t]`` teacher embeddings (a scalar, or ``(loss, parts)``)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"weight={self.weight}, embedding={self.embedding!r}, layer={self.layer}"


def _pooler_path(model: nn.Module, method: str, role: str) -> str:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "pooler" and any(True for _ in module.parameters()):
            return name
    raise ValueError(f"{method}: the {role} ({type(model).__name__}) has no pooler; use embedding='cls' or 'mean'.")


# ---- the relations --------------------------------------------------------------------------------------------
def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` Euclidean distances (exactly 0 on the diagonal, no NaN gradient there)."""
    squared = (x.unsqueeze(0) - x.unsqueeze(1)).pow(2).sum(-1)
    positive = squared > 0
    return torch.where(positive, squared.clamp_min(1e-12).sqrt(), torch.zeros_like(squared))


def rkd_distance(x: torch.Tensor) -> torch.Tensor:
    """``psi_D``: pairwise distances divided by their mean over the non-zero ones."""
    d = pairwise_distances(x)
    positive = d > 0
    mean = d[positive].mean() if bool(positive.any()) else d.new_ones(())
    return d / mean


def rkd_angle(x: torch.Tensor) -> torch.Tensor:
    """``psi_A[j, i, k] = <(e_i - e_j) / ||.||, (e_k - e_j) / ||.||>``, ``[B, B, B]``."""
    directions = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # [j, i] = e_i - e_j, normalised
    return directions @ directions.transpose(1, 2)


@register_distiller("rkd")
class RKDDistiller(RelationDistiller):
    """Relational KD (Park et al., CVPR 2019, https://huggingface.co/papers/1904.05068): distances and angles between
    the samples' embeddings::

        L = distance_weight * Huber(psi_D^s, psi_D^t) + angle_weight * Huber(psi_A^s, psi_A^t)

    ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean non-zero pairwise distance, ``psi_A`` the cosine of the
    angle at ``e_j`` of every triplet; Huber is ``smooth_l1`` (beta 1) averaged over all ``B^2`` / ``B^3`` entries, as
    torchdistill's ``RKDLoss`` and the paper's code. Weights 25 / 50 as the paper; the teacher side runs without
    autograd. Invariant to rotating or translating either embedding space. Logged: ``distance``, ``angle``.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        embedding: str | Mapping[str, str] = "cls",
        layer: int = -1,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
    ) -> None:
        super().__init__(weight, embedding, layer)
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"rkd: `distance_weight` and `angle_weight` must be >= 0, got {distance_weight}, "
                             f"{angle_weight}.")
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def relation_loss(self, student, teacher):
        distance = F.smooth_l1_loss(rkd_distance(student), rkd_distance(teacher))
        angle = F.smooth_l1_loss(rkd_angle(student), rkd_angle(teacher))
        loss = self.distance_weight * distance + self.angle_weight * angle
        return loss, {"distance": distance.detach(), "angle": angle.detach()}


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """SP's ``G = normalize_rows(F F^T)``, ``[B, B]``."""
    return F.normalize(x @ x.t(), p=2, dim=1)


@register_distiller("sp")
class SPDistiller(RelationDistiller):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019, https://huggingface.co/papers/1907.09682)::

        L = ||G_s - G_t||_F^2 / B^2,    G = normalize_rows(E E^T)

    on the ``[B, D]`` embeddings (torchdistill's ``SPKDLoss`` for one layer). The paper weights it by
    ``gamma = 3000`` on CIFAR ResNet features; here ``weight`` (default 1) plays that role.
    """

    def relation_loss(self, student, teacher):
        return (similarity_matrix(student) - similarity_matrix(teacher)).pow(2).sum() / student.shape[0] ** 2


def pkt_probabilities(x: torch.Tensor) -> torch.Tensor:
    """PKT's conditional probabilities ``P_ij = K(x_i, x_j) / sum_k K(x_i, x_k)``, cosine kernel ``(cos + 1) / 2``."""
    x = F.normalize(x, p=2, dim=1, eps=_EPS)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt_divergence(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean_ij P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))`` (torchdistill's ``PKTLoss``, eps 1e-7)."""
    p_s, p_t = pkt_probabilities(student), pkt_probabilities(teacher)
    return (p_t * torch.log((p_t + _EPS) / (p_s + _EPS))).mean()


@register_distiller("pkt")
class PKTDistiller(RelationDistiller):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, https://huggingface.co/papers/1803.10837): the
    teacher's conditional probabilities of the samples' neighbourhoods, ``KL(P^t || P^s)`` with a cosine kernel.

    With ``layers`` (a dict ``{student_layer: teacher_layer}`` of hidden states) it is the information-flow variant
    (Passalis et al., CVPR 2020, https://huggingface.co/papers/2003.12355): PKT at every pair, the pair of the deepest
    student layer with weight 1 and the others with ``intermediate_weight`` — a number or a schedule, e.g. the
    critical-period schedule ``{"schedule": "step", "start": 100, "gamma": 0.7, "milestones": [<a step per
    epoch>]}`` (intermediate weights start high and decay). The paper's auxiliary teacher, combined kernel and
    Jeffreys divergence are not built in. Logged: ``layer_<s>`` per pair. The reference weight on CIFAR is 30000.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        embedding: str | Mapping[str, str] = "cls",
        layer: int = -1,
        layers: Mapping[int, int] | None = None,
        intermediate_weight: Knob = 1.0,
    ) -> None:
        super().__init__(weight, embedding, layer)
        if layers is not None and (embedding not in POOLED or not layers):
            raise ValueError("pkt: `layers` pairs hidden states, so it needs a pooled `embedding` (cls, mean or "
                             "last_token) and at least one pair {student_layer: teacher_layer}.")
        self.layers = None if layers is None else {int(s): int(t) for s, t in layers.items()}
        self.intermediate_weight = self.schedulable("intermediate_weight", intermediate_weight)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        for s, t in (self.layers or {}).items():
            if not (0 <= s <= num_layers(student) and 0 <= t <= num_layers(teacher)):
                raise ValueError(f"pkt: `layers` entry {s} -> {t} is out of range: the student has "
                                 f"{num_layers(student)} layers and the teacher {num_layers(teacher)} "
                                 f"(0 = embeddings).")

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        if self.layers is None:
            return super().forward(student, teacher, batch)
        mask, pooled = batch.get("attention_mask"), POOLED[self.embedding]
        parts, total, last = {}, 0.0, max(self.layers)
        for s, t in sorted(self.layers.items()):
            e_s = select_tokens(student.hidden_states[s], mask, pooled).float()
            with torch.no_grad():
                e_t = layer_tokens(teacher, t, mask, pooled).float()
            parts[f"layer_{s}"] = pkt_divergence(e_s, e_t)
            total = total + (1.0 if s == last else self.intermediate_weight) * parts[f"layer_{s}"]
        return total, {k: v.detach() for k, v in parts.items()}

    def relation_loss(self, student, teacher):
        return pkt_divergence(student, teacher)

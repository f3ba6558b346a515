"""How a logit distiller reads several teachers: one target distribution per row from all of them.

``teacher_aggregation`` on a logit distiller (``{"name": "kl", "teacher_aggregation": "mean"}``, or a dict with the
policy's options, ``{"policy": "weighted", "weights": [2, 1]}``) makes it read every teacher of
``teacher_model=[...]``. Per chunk of rows the row pass hands the distiller all teachers' logits ``z_k``; the policy
turns them, at the distiller's temperature ``T``, into one row of target logits

    z = T * log p + sum_k w_k * T * logsumexp(z_k / T),    p = the policy's target distribution

so ``softmax(z / T) = p`` (every temperature-based divergence sees ``p``), and a policy over identical teachers
returns their logits unchanged (so ``mse`` too gives the single-teacher loss). Mixture policies set
``p = sum_k w_k softmax(z_k / T)`` with per-row weights ``w_k`` (summing to 1):

* ``mean``: ``w_k = 1 / K``.
* ``weighted``: fixed ``weights`` (normalised).
* ``confidence``: per row, ``w = softmax_k(-H(p_k) / tau)`` (``measure="entropy"``, the surer teacher counts more) or
  ``w_k ∝ p_k(y)`` (``measure="true_class"``, needs labels); ``tau`` = ``sharpness`` (1).
* ``vote``: KEnS' (weighted) majority vote: the class most teachers (weighted by ``weights``) rank first wins, and
  the teachers that voted for it are averaged (ties go to the lower class index).
* ``best``: per row the teacher with the highest true-class probability (needs labels).
* ``learned``: ``w = softmax(a)`` of learned per-teacher logits ``a`` (zeros at the start), trained with the student
  (in the distillers' parameter group, checkpointed, never exported). The student matching the teachers'
  distributions jointly through learned edge weights (multi-teacher graph distillation, Zhang & Peng, IJCAI 2018)
  is this policy: the graph's edges into the student are the ``w_k``.

``rank_fusion`` is not a mixture: KEnS' reciprocal-rank fusion (Chen et al., EMNLP Findings 2020,
https://aclanthology.org/2020.findings-emnlp.290) scores each class by ``sum_k v_k / (constant + rank_k(c))``
(rank 1 = the teacher's top class, ``v_k`` = ``weights``), and ``p`` is the scores normalised to sum 1, a target
that keeps only the teachers' orderings. KEnS ranks thousands of entities with ``constant=50``; with few classes
that target is nearly uniform, so the default here is 1 (the top class of one confident teacher gets 1/2 of the
raw score); a choice of ours, configurable.

``weights`` and the number of teachers must agree (checked at setup, before training).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

Policy = Callable[["TeacherAggregation", torch.Tensor, "torch.Tensor | None"], torch.Tensor]
_POLICIES: dict[str, Policy] = {}
NEEDS_LABELS = {"best"}


def register_teacher_aggregation(name: str, needs_labels: bool = False):
    """Register a mixture policy: ``fn(aggregation, log_probs [K, n, V], targets [n] or None) -> w [n, K]``."""

    def wrap(fn: Policy) -> Policy:
        _POLICIES[name] = fn
        if needs_labels:
            NEEDS_LABELS.add(name)
        return fn

    return wrap


def list_teacher_aggregations() -> list[str]:
    return sorted([*_POLICIES, "rank_fusion"])


class TeacherAggregation(nn.Module):
    """One aggregation policy and its options; ``forward(teacher_logits, targets, temperature)`` gives the target
    logits ``[n, V]`` of a chunk of rows from the teachers' ``[n, V]`` logits (see the module docstring).

    Args:
        policy: ``mean``, ``weighted``, ``confidence``, ``vote``, ``rank_fusion``, ``best``, ``learned`` or a name
            given to :func:`register_teacher_aggregation`.
        weights: One positive number per teacher (``weighted``, and the votes of ``vote`` / ``rank_fusion``).
        measure: ``entropy`` or ``true_class`` (``confidence``).
        sharpness: ``tau`` of ``confidence="entropy"``.
        constant: The reciprocal-rank constant of ``rank_fusion``.
    """

    def __init__(self, policy: str, weights: Sequence[float] | None = None, measure: str = "entropy",
                 sharpness: float = 1.0, constant: float = 1.0) -> None:
        super().__init__()
        if policy not in list_teacher_aggregations():
            raise ValueError(f"Unknown teacher_aggregation policy {policy!r}; choose one of "
                             f"{list_teacher_aggregations()}.")
        if policy == "weighted" and weights is None:
            raise ValueError("teacher_aggregation 'weighted' needs `weights`, one per teacher, e.g. "
                             "{'policy': 'weighted', 'weights': [2, 1]}.")
        if weights is not None and (not weights or any(not w > 0 for w in weights)):
            raise ValueError(f"teacher_aggregation `weights` must be positive numbers, one per teacher; got {weights}.")
        if measure not in ("entropy", "true_class"):
            raise ValueError(f"teacher_aggregation 'confidence': `measure` is 'entropy' or 'true_class', got "
                             f"{measure!r}.")
        if not sharpness > 0 or not constant > 0:
            raise ValueError(f"teacher_aggregation: `sharpness` and `constant` must be > 0, got {sharpness}, "
                             f"{constant}.")
        self.policy, self.weights, self.measure = policy, None if weights is None else list(weights), measure
        self.sharpness, self.constant = sharpness, constant
        self.logits: nn.Parameter | None = None

    @classmethod
    def from_option(cls, option: str | Mapping[str, Any]) -> TeacherAggregation:
        """From the distiller option: a policy name or a dict ``{"policy": name, **options}``."""
        if isinstance(option, str):
            return cls(option)
        if not isinstance(option, Mapping) or "policy" not in option:
            raise ValueError(f"`teacher_aggregation` is a policy name or a dict like {{'policy': 'weighted', "
                             f"'weights': [2, 1]}}; got {option!r}.")
        options = dict(option)
        return cls(options.pop("policy"), **options)

    @property
    def needs_labels(self) -> bool:
        return self.policy in NEEDS_LABELS or (self.policy == "confidence" and self.measure == "true_class")

    def setup(self, num_teachers: int) -> None:
        """Check the options against the teachers, and create the learned weights."""
        if self.weights is not None and len(self.weights) != num_teachers:
            raise ValueError(f"teacher_aggregation `weights` has {len(self.weights)} entries but `teacher_model` has "
                             f"{num_teachers} teachers; give one weight per teacher.")
        if self.policy == "learned":
            self.logits = nn.Parameter(torch.zeros(num_teachers))

    def vote_weights(self, count: int, like: torch.Tensor) -> torch.Tensor:
        weights = torch.ones(count) if self.weights is None else torch.tensor(self.weights)
        return weights.to(like.device, like.dtype)

    def forward(self, teacher_logits: Sequence[torch.Tensor], targets: torch.Tensor | None,
                temperature: float) -> torch.Tensor:
        z = torch.stack(list(teacher_logits)) / temperature  # [K, n, V]
        log_partition = z.logsumexp(-1)  # [K, n]
        log_probs = z - log_partition.unsqueeze(-1)
        if self.needs_labels and targets is None:
            raise ValueError(f"teacher_aggregation {self.policy!r} reads the true class: the batch needs `labels`.")
        if self.policy == "rank_fusion":
            ranks = log_probs.argsort(-1, descending=True).argsort(-1).to(z.dtype) + 1  # 1 = top class
            votes = self.vote_weights(len(z), z)
            scores = (votes[:, None, None] / (self.constant + ranks)).sum(0)
            target = (scores / scores.sum(-1, keepdim=True)).log()
            weights = votes.expand(z.shape[1], -1) / votes.sum()
        else:
            weights = _POLICIES[self.policy](self, log_probs, targets)  # [n, K]
            target = (log_probs + weights.t().clamp_min(1e-30).log().unsqueeze(-1)).logsumexp(0)
        offset = (weights.t() * log_partition).sum(0, keepdim=True).t()  # [n, 1]
        return temperature * (target + offset)

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}" + (f", weights={self.weights}" if self.weights is not None else "")


@register_teacher_aggregation("mean")
def mean_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    return log_probs.new_full(log_probs.shape[1::-1], 1.0 / len(log_probs))


@register_teacher_aggregation("weighted")
def weighted_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    weights = aggregation.vote_weights(len(log_probs), log_probs)
    return (weights / weights.sum()).expand(log_probs.shape[1], -1)


@register_teacher_aggregation("confidence")
def confidence_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    if aggregation.measure == "true_class":
        true = log_probs.gather(-1, targets.view(1, -1, 1).expand(len(log_probs), -1, 1)).squeeze(-1)  # [K, n]
        return true.t().softmax(-1)  # p_k(y) / sum_j p_j(y)
    entropy = -(log_probs.exp() * log_probs).sum(-1)  # [K, n]
    return (-entropy.t() / aggregation.sharpness).softmax(-1)


@register_teacher_aggregation("vote")
def vote_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    choice = log_probs.argmax(-1)  # [K, n]
    votes = aggregation.vote_weights(len(log_probs), log_probs)
    tally = torch.zeros(log_probs.shape[1:], dtype=log_probs.dtype, device=log_probs.device)  # [n, V]
    tally.scatter_add_(1, choice.t(), votes.expand(choice.shape[1], -1))
    winner = tally.argmax(-1)  # the first maximum: ties go to the lower class index
    voted = (choice.t() == winner.unsqueeze(1)).to(log_probs.dtype) * votes  # [n, K]
    return voted / voted.sum(-1, keepdim=True)


@register_teacher_aggregation("best", needs_labels=True)
def best_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    true = log_probs.gather(-1, targets.view(1, -1, 1).expand(len(log_probs), -1, 1)).squeeze(-1)  # [K, n]
    return nn.functional.one_hot(true.argmax(0), len(log_probs)).to(log_probs.dtype)


@register_teacher_aggregation("learned")
def learned_policy(aggregation: TeacherAggregation, log_probs: torch.Tensor, targets):
    return aggregation.logits.softmax(0).to(log_probs.dtype).expand(log_probs.shape[1], -1)

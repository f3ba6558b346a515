"""Contrastive representation distillation (Tian et al., ICLR 2020, https://huggingface.co/papers/1910.10699)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import SAMPLE_INDEX
from ..capture import ModelView
from ..processes import gather_rows
from ..projectors import build_projector, project
from ..schedules import Knob
from ..step_random import StepRandom
from .base import register_distiller
from .relation import RelationDistiller


def critic_scores(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float):
    """``anchor . x / tau`` of ``[B, D]`` anchors with their ``[B, D]`` positives (``[B]``) and ``[B, N, D]`` negatives
    (``[B, N]``), all L2-normalised."""
    return (anchor * positive).sum(-1) / tau, torch.einsum("bd,bnd->bn", anchor, negatives) / tau


def nce_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, z: torch.Tensor, tau: float,
             dataset_size: int) -> torch.Tensor:
    """CRD's NCE loss of ``[B, D]`` anchors against their ``[B, D]`` positives and ``[B, N, D]`` negatives (all
    L2-normalised), averaged over the batch::

        h(x) = exp(anchor . x / tau) / Z,    c = N / M
        L = -log(h_pos / (h_pos + c)) - sum_neg log(c / (h_neg + c))

    ``M`` is ``dataset_size``; ``Z`` the critic's normalisation constant (a scalar tensor)."""
    return nce_loss_of_scores(*critic_scores(anchor, positive, negatives, tau), z, dataset_size)


def nce_loss_of_scores(positive: torch.Tensor, negatives: torch.Tensor, z: torch.Tensor,
                       dataset_size: int) -> torch.Tensor:
    """:func:`nce_loss` from the critic's scores (:func:`critic_scores`), in log space:
    ``-log(h / (h + c)) = softplus(log c - log h)`` and ``-log(c / (h + c)) = softplus(log h - log c)``."""
    log_z, log_c = z.log(), math.log(negatives.shape[1] / dataset_size)
    log_pos, log_neg = positive - log_z, negatives - log_z
    return (F.softplus(log_c - log_pos) + F.softplus(log_neg - log_c).sum(-1)).mean()


def normalisation_constant(positive: torch.Tensor, negatives: torch.Tensor, dataset_size: int) -> torch.Tensor:
    """RepDistiller's estimate of ``Z`` from a batch's critic scores: ``M`` times the mean of ``exp(score)`` over the
    positives and negatives, the batch being the micro-batches of all processes."""
    exp = torch.cat([positive.unsqueeze(1), negatives], dim=1).exp()
    total, count = gather_rows(torch.stack([exp.sum(), exp.new_tensor(exp.numel())]).unsqueeze(0)).sum(0)
    return total / count * dataset_size


@register_distiller("crd")
class CRDDistiller(RelationDistiller):
    """Contrastive representation distillation (Tian et al., ICLR 2020, https://huggingface.co/papers/1910.10699): the
    student's embedding of a sample must pick the teacher's embedding of the same sample out of ``N`` other samples'
    embeddings, read from a memory bank over the train dataset.

    Both embeddings are projected to ``feat_dim`` and L2-normalised, ``g_s = normalize(W_s e_s)``,
    ``g_t = normalize(W_t e_t)`` (``W_s``, ``W_t`` trained with the student, checkpointed, never exported). Two memory
    banks of ``M`` (the train dataset's size) rows hold each sample's momentum-averaged ``g_s`` and ``g_t``. With
    ``h(a, x) = exp(a . x / nce_t) / Z`` and ``c = N / M`` (uniform noise)::

        L_side = mean_i [ -log(h(a_i, p_i) / (h(a_i, p_i) + c)) - sum_{j in neg(i)} log(c / (h(a_i, bank_j) + c)) ]
        L = L_teacher_bank + L_student_bank

    ``L_teacher_bank``: anchor ``g_s``, positive ``g_t``, negatives from the teacher bank; ``L_student_bank``: anchor
    ``g_t``, positive ``g_s``, negatives from the student bank (RepDistiller's ``CRDLoss``, ``s_loss + t_loss``).
    Logged: ``teacher_bank``, ``student_bank``. Reference weight ``beta = 0.8``, the default here.

    Choices where RepDistiller is not explicit or does otherwise:

    * The positive is the current embedding of the other model (the paper's critic ``h(T, S)``); RepDistiller reads
      the other model's bank row of the sample, which is random noise during the first epoch.
    * ``N = min(nce_k, M - 1)`` negatives per sample are drawn uniformly from the bank, without the sample itself
      (RepDistiller's uniform mode may draw it). A sample's draws are a pure function of ``(seed, optimizer step, its
      dataset index)`` (:meth:`~hf_kd.step_random.StepRandom.keyed`): a resumed run draws what the uninterrupted run
      did, and a sample draws the same whichever micro-batch or process it lands in.
    * ``Z`` (one per bank) is estimated on the first training micro-batch (of all processes together), as
      RepDistiller does, and then fixed; it is a buffer, so a resumed run keeps it.
    * After each training micro-batch's loss, its rows of both banks become ``normalize(momentum * row + (1 -
      momentum) * g)`` (without autograd); with gradient accumulation each micro-batch updates its own rows, so a
      later micro-batch of the same step may draw them as negatives. With several processes every process applies
      the rows of all processes' micro-batches, so the banks stay identical everywhere: 2 processes x 4 samples
      compute what 1 process x 8 does.

    The bank is initialised uniformly in ``[-s, s]``, ``s = 1 / sqrt(feat_dim / 3)``. The term is batch-level: each
    micro-batch's loss is weighted by its share of the step. It needs each sample's train-dataset index
    (``needs_sample_index``: the trainer adds it, :mod:`hf_kd.sample_index`); evaluation batches have none, and the
    banks are not touched in evaluation, where the term is 0.

    Args:
        weight, embedding, layer: As every relation distiller (:class:`RelationDistiller`).
        feat_dim: Width of the contrastive embeddings (128).
        nce_k: Negatives per sample (16384; at most ``M - 1`` are used).
        nce_t: Temperature ``tau`` of the critic (0.07).
        momentum: Weight of the old bank row in its update (0.5).
        seed: Seed of the negative draws (``None``: ``TrainingArguments.seed``).
    """

    needs_sample_index = True

    def __init__(
        self,
        weight: Knob = 0.8,
        embedding: str | Mapping[str, str] = "cls",
        layer: int = -1,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, embedding, layer)
        if feat_dim < 1 or nce_k < 1 or not nce_t > 0 or not 0 <= momentum < 1:
            raise ValueError(f"crd: needs `feat_dim` >= 1, `nce_k` >= 1, `nce_t` > 0 and 0 <= `momentum` < 1; got "
                             f"{feat_dim}, {nce_k}, {nce_t}, {momentum}.")
        self.feat_dim, self.nce_k, self.nce_t, self.momentum = feat_dim, nce_k, nce_t, momentum
        self.random = StepRandom(seed)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if self.dataset_size is None or self.dataset_size < 2:
            raise ValueError(f"crd contrasts each training sample with others of the train dataset: it needs a "
                             f"`train_dataset` of at least 2 samples (got size {self.dataset_size}).")
        widths = {role: self.width(model, role) for role, model in (("student", student), ("teacher", teacher))}
        self.embed_student = build_projector(widths["student"], self.feat_dim, "linear")
        self.embed_teacher = build_projector(widths["teacher"], self.feat_dim, "linear")
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for role in ("student", "teacher"):
            self.register_buffer(f"bank_{role}", torch.rand(self.dataset_size, self.feat_dim) * 2 * stdv - stdv)
            self.register_buffer(f"z_{role}_bank", torch.tensor(-1.0))  # < 0: not estimated yet

    @property
    def num_negatives(self) -> int:
        return min(self.nce_k, self.dataset_size - 1)

    def negatives(self, index: torch.Tensor, step: int) -> torch.Tensor:
        """``[B, N]`` bank rows drawn uniformly among the other ``M - 1`` samples of each sample ``index`` (``[B]``), at
        optimizer step ``step``."""
        index = index.cpu()
        drawn = torch.stack([
            torch.randint(0, self.dataset_size - 1, (self.num_negatives,), generator=self.random.keyed(step, int(i)))
            for i in index.tolist()
        ])
        return (drawn + (drawn >= index.unsqueeze(1)).long()).to(self.bank_student.device)

    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        index = batch.get(SAMPLE_INDEX)
        if index is None or not student.model.training:  # evaluation: no index, and the banks stay as they are
            return self.bank_student.new_zeros(())
        index = index.to(self.bank_student.device).long()
        e_s = self.embeddings(student, batch, "student")
        with torch.no_grad():
            e_t = self.embeddings(teacher, batch, "teacher")
        g_s = F.normalize(project(self.embed_student, e_s).float(), dim=1)
        g_t = F.normalize(project(self.embed_teacher, e_t).float(), dim=1)
        negatives = self.negatives(index, self.global_step)
        parts = {}
        for bank, anchor, positive in (("teacher", g_s, g_t), ("student", g_t, g_s)):
            scores = critic_scores(anchor, positive, getattr(self, f"bank_{bank}")[negatives], self.nce_t)
            z = getattr(self, f"z_{bank}_bank")
            with torch.no_grad():  # fixed at the first training micro-batch (no host sync)
                z.copy_(torch.where(z > 0, z, normalisation_constant(*scores, self.dataset_size)))
            parts[f"{bank}_bank"] = nce_loss_of_scores(*scores, z, self.dataset_size)
        with torch.no_grad():  # every process applies every process's rows
            index = gather_rows(index)
            for role, g in (("student", g_s), ("teacher", g_t)):
                bank = getattr(self, f"bank_{role}")
                bank[index] = F.normalize(self.momentum * bank[index] + (1 - self.momentum) * gather_rows(g), dim=1)
        loss = parts["teacher_bank"] + parts["student_bank"]
        return loss, {name: value.detach() for name, value in parts.items()}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, nce_t={self.nce_t}, "
                f"momentum={self.momentum}")

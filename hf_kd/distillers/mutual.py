"""``mutual`` and its subclass ``p2p``: the student learns together with ``num_peers`` peer models.

- ``mutual``: DML, deep mutual learning (Zhang et al., CVPR 2018): the student and ``num_peers`` peer models teach
  each other; no teacher.
- ``p2p``: peer-to-peer mutual learning plus KD (Niyaz & Bathula, https://huggingface.co/papers/2110.11023): a frozen
teacher teaches the
  student and its peers, which also teach each other.

Peers are submodules of the distiller: the trainer trains them in the distillers' param group and saves them in
``distillers.pt`` with every checkpoint (never in the exported student); ``save_peers(dir)`` exports each one with
``save_pretrained``. Conventions of the online distillers (logits, logging): see ``docs/distillers.md``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..architecture import model_inputs
from ..capture import ModelView, Requirements
from ..schedules import Knob
from .base import Distiller, batch_labels, register_distiller
from .divergences import tempered_kl


@register_distiller("mutual")
class MutualLearningDistiller(Distiller):
    """Deep mutual learning (Zhang et al., CVPR 2018, https://huggingface.co/papers/1706.00384): the student and
    ``num_peers`` peers teach each other.

    With models ``0`` (the student) and ``1..K-1`` (the peers, submodules of this distiller)::

        student: L_0 = T^2 * mean_{l >= 1} KL(p_l^T || p_0^T)                 (+ CE: hard_label_weight)
        peer k:  L_k = CE(y, p_k) + T^2 * mean_{l != k} KL(p_l^T || p_k^T)    (p_l detached in L_k)

    The loss returned is ``L_0 + sum_k L_k`` (all models are trained jointly in one backward pass); sub-terms
    ``student`` and ``peer_{k}`` (``k`` from 0) are logged. No teacher is needed. Peers are built in ``setup`` from
    the student: ``init="scratch"`` (the student's class and config, freshly initialised; ``seed`` makes that
    reproducible), ``"student"`` (a copy of the student's initial weights — use this when fine-tuning a pretrained
    student, and keep dropout on so the copies diverge), or a path / Hub id loaded with the student's class
    ``from_pretrained``. Peers run on the batch's model inputs (everything but ``labels``) in the student's
    train/eval mode; they are trained in the distillers' param group, saved in ``distillers.pt`` with each
    checkpoint, and exported with :meth:`save_peers`.

    Args:
        weight: Factor of the whole loss (student and peers) in the total.
        temperature: ``T`` of the mutual KLs (DML uses 1).
        num_peers: Number of peers beside the student (``K - 1``).
        init: ``"scratch"``, ``"student"``, or a path / Hub id.
        seed: Seed of the fresh initialisation with ``init="scratch"`` (peer ``k`` uses ``seed + k``); ``None``:
            the global generator.
    """

    family = "online"

    requires = Requirements(logits=True, labels=True, teacher=False)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        num_peers: int = 1,
        init: str = "scratch",
        seed: int | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if int(num_peers) < 1:
            raise ValueError(f"{self.name}: `num_peers` must be >= 1, got {num_peers}.")
        if not isinstance(init, str) or not init:
            raise ValueError(f"{self.name}: `init` is 'scratch', 'student' or a path / Hub id, got {init!r}.")
        self.num_peers, self.init, self.seed = int(num_peers), init, seed
        self.peers = nn.ModuleList()

    def setup(self, student, teacher):
        if len(self.peers):  # already built (setup called twice): keep the trained peers
            return
        if not hasattr(student, "config"):
            raise ValueError(f"{self.name}: peers are built from the student's config; the student has none.")
        peers = []
        for k in range(self.num_peers):
            if self.init == "student":
                peer = copy.deepcopy(student)
            elif self.init == "scratch":
                with torch.random.fork_rng(devices=[]):
                    if self.seed is not None:
                        torch.manual_seed(self.seed + k)
                    peer = type(student)(copy.deepcopy(student.config))
            else:
                peer = type(student).from_pretrained(self.init)
            dtype = next(student.parameters()).dtype
            peers.append(peer.to(dtype).requires_grad_(True))
        self.peers.extend(peers)

    def save_peers(self, output_dir: str | os.PathLike) -> list[str]:
        """Write each peer with ``save_pretrained`` to ``output_dir/peer_{k}``; returns the folders."""
        folders = []
        for k, peer in enumerate(self.peers):
            folder = os.path.join(output_dir, f"peer_{k}")
            peer.save_pretrained(folder)
            folders.append(folder)
        return folders

    def peer_logits(self, batch: Mapping[str, Any], training: bool) -> list[torch.Tensor]:
        logits = []
        for peer in self.peers:
            peer.train(training)
            view = ModelView(model=peer, task="classification", logits=peer(**model_inputs(batch, peer)).logits)
            logits.append(view.class_logits("peer", self.name))
        return logits

    def teacher_terms(self, z_teacher: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | float:
        """Extra loss each student/peer gets from the teacher (none for DML)."""
        return 0.0

    def forward(self, student, teacher, batch):
        z_s = student.class_logits("student", self.name)
        labels = batch_labels(batch, self.name)
        z_t = teacher.class_logits("teacher", self.name).detach() if self.requires.teacher else None
        models = [z_s, *self.peer_logits(batch, student.model.training)]
        t = self.temperature
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | float = 0.0
        for k, z_k in enumerate(models):
            others = [z_j.detach() for j, z_j in enumerate(models) if j != k]
            mutual = torch.stack([tempered_kl(z_k, z_l, t) for z_l in others]).mean(0).mean()
            loss_k = mutual + self.teacher_terms(z_t, z_k)
            if k > 0:
                loss_k = loss_k + F.cross_entropy(z_k, labels)
                parts[f"peer_{k - 1}"] = loss_k.detach()
                parts[f"peer_{k - 1}_accuracy"] = (z_k.argmax(-1) == labels).float().mean()
            else:
                parts["student"] = loss_k.detach()
            total = total + loss_k
        return total, parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, num_peers={self.num_peers}, init={self.init!r}"


@register_distiller("p2p")
class PeerToPeerDistiller(MutualLearningDistiller):
    """Peer-to-peer mutual learning with a teacher (Niyaz & Bathula, https://huggingface.co/papers/2110.11023).

    A frozen teacher teaches the student and ``num_peers`` peers, which also learn from each other::

        student: L_0 = T_t^2 KL(p_t^{T_t} || p_0^{T_t}) + mean_{l >= 1} T^2 KL(p_l^T || p_0^T)       (+ CE: hard term)
        peer k:  L_k = CE(y, p_k) + T_t^2 KL(p_t^{T_t} || p_k^{T_t}) + mean_{l != k} T^2 KL(p_l^T || p_k^T)

    (others detached in each ``L_k``; with one peer its mutual term is ``KL(p_student || p_peer)``). The paper uses
    the ensemble of the students at inference; export the peers with :meth:`save_peers`. Peers are built as in
    ``mutual``. The weights of the terms are unverified (all 1 here).

    Args:
        temperature: ``T`` of the mutual (peer) KLs, 1 by default.
        teacher_temperature: ``T_t`` of the teacher KLs.
        Others as in ``mutual``.
    """

    requires = Requirements(logits=True, labels=True, teacher=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        teacher_temperature: Knob = 4.0,
        num_peers: int = 1,
        init: str = "scratch",
        seed: int | None = None,
    ) -> None:
        super().__init__(weight, temperature, num_peers, init, seed)
        self.teacher_temperature = self.schedulable("teacher_temperature", teacher_temperature, positive=True)

    def teacher_terms(self, z_teacher, z):
        return tempered_kl(z, z_teacher, self.teacher_temperature).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", teacher_temperature={self.teacher_temperature}"

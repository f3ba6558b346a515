"""Online distillers: methods where something besides the student learns during distillation.

- ``bdkd``: BD-KD (Amara et al., arXiv 2212.12965): a per-sample balance of forward and reverse KL for the student;
  optionally the teacher learns too (``online_teacher=True``).
- ``dualde``: DualDE (Zhu et al., WSDM 2022, arXiv 2009.05912), adapted from KG-embedding scores to any classifier:
  soft/hard weighting by the teacher's confidence, and a second stage where the teacher learns from the student.
- ``mutual``: DML (Zhang et al., CVPR 2018): the student and ``num_peers`` peer models teach each other; no teacher.
- ``p2p``: peer-to-peer mutual learning plus KD (Niyaz & Bathula, arXiv 2110.11023): a frozen teacher teaches the
  student and its peers, which also teach each other.

Peers are submodules of the distiller: the trainer trains them in the distillers' param group and saves them in
``distillers.pt`` with every checkpoint (never in the exported student); ``save_peers(dir)`` exports each one with
``save_pretrained``. Teacher-side parameters are declared with ``teacher_parameters()`` (the trainer unfreezes them,
trains them with ``DistillationArguments.teacher_learning_rate`` and checkpoints them).

All four work on classifier logits ``[B, C]``. Every loss is returned as one scalar (the student's, peers' and
teacher's terms summed, so the distiller's ``weight`` scales all of them), with each side logged as a sub-term
(``loss/<name>/student``, ``loss/<name>/teacher``, ``loss/<name>/peer_0``, ...). Reductions are per sample
(``batchmean``); temperature-scaled KLs are multiplied by ``T^2``. The student's own cross-entropy is the trainer's
``hard_label_weight`` term, except for ``dualde``, which holds its hard term itself.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..capture import ModelView, Requirements, model_inputs
from .base import Distiller, register_distiller
from .divergences import forward_kl, reverse_kl
from .logit import Knob

Weighting = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- helpers -----------------------------------------------------------------------------------------------------
def _class_logits(view: ModelView, role: str, method: str) -> torch.Tensor:
    logits = view.logits
    if logits is None or logits.dim() != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(
            f"{method} works on classifier logits [batch, classes]; the {role} gave logits of shape {shape}. Use it "
            "with sequence/image classification models."
        )
    return logits.float()


def _labels(batch: Mapping[str, Any], method: str) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise ValueError(f"{method} needs `labels` (one class index per sample) in every batch.")
    return labels


def _kl_t(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` per row (the caller detaches whichever side must not learn)."""
    return forward_kl(student / temperature, teacher / temperature) * temperature**2


def _teacher_side_parameters(teacher: nn.Module | None, modules: Sequence[str] | None, method: str) -> list:
    if teacher is None:
        raise ValueError(f"{method} trains teacher-side parameters, so it needs `teacher_model=`.")
    if modules is None:
        return list(teacher.parameters())
    if isinstance(modules, str):
        modules = [modules]
    params = []
    for name in modules:
        try:
            params.extend(teacher.get_submodule(name).parameters())
        except AttributeError:
            names = [n for n, _ in teacher.named_children()]
            raise ValueError(
                f"{method}: the teacher has no submodule {name!r} (`teacher_modules`). Its top-level modules: {names}; "
                "use dotted names from teacher.named_modules()."
            ) from None
    if not params:
        raise ValueError(f"{method}: `teacher_modules={list(modules)}` hold no parameters.")
    return params


# ---- BD-KD -------------------------------------------------------------------------------------------------------
_WEIGHTINGS: dict[str, Weighting] = {}


def register_bdkd_weighting(name: str):
    """Decorator: make ``fn(student_logits, teacher_logits) -> w_r`` (``[B]`` in ``[0, 1]``) usable as
    ``bdkd``'s ``weighting=name``. ``w_r`` weights the reverse KL, ``1 - w_r`` the forward KL."""

    def decorate(fn: Weighting) -> Weighting:
        _WEIGHTINGS[name] = fn
        return fn

    return decorate


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


@register_bdkd_weighting("entropy")
def entropy_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``w_r = H(p_s) / (H(p_s) + H(p_t))`` on the untempered distributions (placeholder form, unverified)."""
    h_s, h_t = _entropy(student), _entropy(teacher)
    return h_s / (h_s + h_t).clamp_min(1e-12)


@register_bdkd_weighting("forward")
def forward_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Forward KL only (``w_r = 0``): plain KD, for ablations."""
    return student.new_zeros(student.shape[0])


@register_bdkd_weighting("reverse")
def reverse_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Reverse KL only (``w_r = 1``), for ablations."""
    return student.new_ones(student.shape[0])


@register_bdkd_weighting("balanced")
def balanced_weighting(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Fixed ``w_r = w_f = 0.5``, for ablations."""
    return student.new_full((student.shape[0],), 0.5)


@register_distiller("bdkd")
class BDKDDistiller(Distiller):
    """BD-KD, "balancing divergences" for online KD (Amara et al., arXiv 2212.12965).

    Student::

        L_S = T^2 * mean_x [ w_f(x) KL(p_t^T || p_s^T) + w_r(x) KL(p_s^T || p_t^T) ]     (+ CE: hard_label_weight)

    with ``w_r = weighting(z_s, z_t)`` detached and ``w_f = 1 - w_r``. With ``online_teacher=True`` the teacher (all
    its parameters, or those of ``teacher_modules``) learns at the same time with the v1 teacher loss::

        L_T = CE(y, p_t) + T^2 * mean_x KL(p_s^T || p_t^T)          (student logits detached)

    and runs in train mode (dropout) during training. The returned loss is ``L_S (+ L_T)``; both are logged as
    ``student`` / ``teacher`` sub-terms, with the two KLs and the mean ``w_r``.

    **Unverified:** the paper's exact form of ``w_f, w_r`` (only the abstract was available). The default
    ``weighting="entropy"``, ``w_r = H(p_s) / (H(p_s) + H(p_t))`` at temperature 1, is the placeholder of
    ``methods.md`` B7 — the less certain the student is relative to the teacher, the more reverse (mode-seeking)
    KL. Other names: ``"forward"``, ``"reverse"``, ``"balanced"``; or pass a callable
    ``fn(student_logits, teacher_logits) -> w_r [B]`` (or register one with :func:`register_bdkd_weighting`).
    The v2 variant (mirrored balance in the teacher loss) is not implemented.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` (number or schedule).
        weighting: Name of a registered weighting, or a callable.
        online_teacher: Train the teacher too (needs ``labels``).
        teacher_modules: With ``online_teacher``: dotted names of the teacher submodules to train (e.g.
            ``["classifier"]``); ``None``: all of the teacher.
    """

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        weighting: str | Weighting = "entropy",
        online_teacher: bool = False,
        teacher_modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if isinstance(weighting, str):
            if weighting not in _WEIGHTINGS:
                valid = ", ".join(sorted(_WEIGHTINGS))
                raise ValueError(f"bdkd: unknown `weighting` {weighting!r}. Valid names: {valid}.")
            self.weighting_fn = _WEIGHTINGS[weighting]
        elif callable(weighting):
            self.weighting_fn = weighting
        else:
            raise ValueError(f"bdkd: `weighting` must be a name or a callable, got {weighting!r}.")
        if teacher_modules is not None and not online_teacher:
            raise ValueError("bdkd: `teacher_modules` only applies with `online_teacher=True`.")
        self.online_teacher = bool(online_teacher)
        self.teacher_modules = teacher_modules
        self.requires = Requirements(logits=True, labels=self.online_teacher)
        self.teacher_train_mode = self.online_teacher
        self._teacher_params: list[nn.Parameter] = []  # a plain list: teacher weights are not distiller state

    def setup(self, student, teacher):
        if self.online_teacher:
            self._teacher_params = _teacher_side_parameters(teacher, self.teacher_modules, "bdkd")

    def teacher_parameters(self):
        return list(self._teacher_params)

    def reverse_weight(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``w_r`` per sample (detached, clamped to ``[0, 1]``)."""
        with torch.no_grad():
            return self.weighting_fn(student_logits.detach(), teacher_logits.detach()).float().clamp(0.0, 1.0)

    def forward(self, student, teacher, batch):
        z_s = _class_logits(student, "student", "bdkd")
        z_t = _class_logits(teacher, "teacher", "bdkd")
        t = self.temperature
        w_r = self.reverse_weight(z_s, z_t)
        z_t_fixed = z_t.detach()
        fwd = forward_kl(z_s / t, z_t_fixed / t)
        rev = reverse_kl(z_s / t, z_t_fixed / t)
        student_loss = (t * t) * ((1.0 - w_r) * fwd + w_r * rev).mean()
        parts = {
            "student": student_loss.detach(),
            "forward_kl": fwd.mean().detach() * t * t,
            "reverse_kl": rev.mean().detach() * t * t,
            "w_reverse": w_r.mean(),
        }
        loss = student_loss
        if self.online_teacher:
            labels = _labels(batch, "bdkd with online_teacher=True")
            teacher_loss = F.cross_entropy(z_t, labels) + (t * t) * reverse_kl(z_s.detach() / t, z_t / t).mean()
            parts["teacher"] = teacher_loss.detach()
            loss = loss + teacher_loss
        return loss, parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}, online_teacher={self.online_teacher}"


# ---- DualDE ------------------------------------------------------------------------------------------------------
@register_distiller("dualde")
class DualDEDistiller(Distiller):
    """DualDE (Zhu et al., WSDM 2022, arXiv 2009.05912), adapted from KG-embedding triple scores to classifier logits.

    Stage 1 (optimizer steps ``< stage2_step``, teacher frozen)::

        w(x)  = sigmoid(beta * (p_t(y|x) - c))                 teacher's confidence on the true label, detached
        L_S   = mean_x [ w(x) * T^2 KL(p_t^T || p_s^T) + (1 - w(x)) * CE(y, p_s) ]

    Stage 2 (from optimizer step ``stage2_step``): the teacher (all parameters, or ``teacher_modules``) also learns
    from the student with the symmetric loss, weighted by the student's confidence::

        v(x)  = sigmoid(beta * (p_s(y|x) - c))                 detached
        L_T   = mean_x [ v(x) * T^2 KL(p_s^T || p_t^T) + (1 - v(x)) * CE(y, p_t) ]   (student logits detached)

    The stage is set in ``set_progress`` from the trainer's ``global_step`` (driven by ``ScheduleCallback``), so a run
    resumed from a checkpoint switches at the same step. The teacher-side parameters are declared from the start
    (the optimizer is built once), but in stage 1 the teacher's logits are detached: they get no gradient and the
    optimizer leaves them bitwise unchanged. ``stage2_step=None``: stage 1 only (the teacher stays frozen and runs
    without autograd).

    The hard cross-entropy is inside this loss, so set ``hard_label_weight=0`` unless you want extra CE on top.
    Logged sub-terms: ``soft``, ``hard``, ``w`` (mean teacher weight), ``student`` and, in stage 2, ``teacher``.

    **Unverified / adapted:** ``methods.md`` B4 has the method only from its abstract. The sigmoid form of the
    weight, the confidences at temperature 1, and KL in place of the paper's Huber losses on triple scores and
    embedding structure are this library's adaptation to classifiers; the paper's structure term (head/tail
    embedding norms and angles) is not implemented.

    Args:
        weight: Factor of the loss in the total (number or schedule).
        temperature: ``T`` of the soft term (number or schedule).
        beta: Sharpness of the confidence weighting.
        c: Confidence at which soft and hard terms weigh the same.
        stage2_step: Optimizer step at which stage 2 begins; ``None``: never.
        teacher_modules: Teacher submodules trained in stage 2 (e.g. ``["classifier"]``); ``None``: the whole teacher.
    """

    requires = Requirements(logits=True, labels=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        beta: float = 10.0,
        c: float = 0.5,
        stage2_step: int | None = None,
        teacher_modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight)
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        if beta < 0:
            raise ValueError(f"dualde: `beta` must be >= 0, got {beta}.")
        if stage2_step is not None and stage2_step < 0:
            raise ValueError(f"dualde: `stage2_step` must be a step number >= 0 (or None), got {stage2_step}.")
        if teacher_modules is not None and stage2_step is None:
            raise ValueError("dualde: `teacher_modules` only applies with a `stage2_step`.")
        self.beta, self.c = float(beta), float(c)
        self.stage2_step = stage2_step
        self.teacher_modules = teacher_modules
        self._teacher_params: list[nn.Parameter] = []

    @property
    def stage(self) -> int:
        return 2 if self.stage2_step is not None and self.global_step >= self.stage2_step else 1

    def setup(self, student, teacher):
        if self.stage2_step is not None:
            self._teacher_params = _teacher_side_parameters(teacher, self.teacher_modules, "dualde")

    def teacher_parameters(self):
        return list(self._teacher_params)

    def confidence_weight(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``sigmoid(beta * (p(y|x) - c))`` per sample, detached."""
        with torch.no_grad():
            p_y = logits.detach().float().softmax(-1).gather(-1, labels.view(-1, 1)).squeeze(-1)
            return torch.sigmoid(self.beta * (p_y - self.c))

    def _mixed(self, learner: torch.Tensor, guide: torch.Tensor, labels: torch.Tensor, w: torch.Tensor):
        soft = _kl_t(learner, guide.detach(), self.temperature)
        hard = F.cross_entropy(learner, labels, reduction="none")
        return (w * soft + (1.0 - w) * hard).mean(), soft.mean(), hard.mean()

    def forward(self, student, teacher, batch):
        z_s = _class_logits(student, "student", "dualde")
        z_t = _class_logits(teacher, "teacher", "dualde")
        labels = _labels(batch, "dualde")
        w = self.confidence_weight(z_t, labels)
        student_loss, soft, hard = self._mixed(z_s, z_t, labels, w)
        parts = {"student": student_loss.detach(), "soft": soft.detach(), "hard": hard.detach(), "w": w.mean()}
        if self.stage == 1:
            return student_loss, parts
        teacher_loss, _, _ = self._mixed(z_t, z_s, labels, self.confidence_weight(z_s, labels))
        parts["teacher"] = teacher_loss.detach()
        return student_loss + teacher_loss, parts

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, temperature={self.temperature}, beta={self.beta}, c={self.c}, "
                f"stage2_step={self.stage2_step}")


# ---- DML and P2P -------------------------------------------------------------------------------------------------
@register_distiller("mutual")
class MutualLearningDistiller(Distiller):
    """Deep mutual learning (Zhang et al., CVPR 2018): the student and ``num_peers`` peers teach each other.

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
        inputs = model_inputs(batch)
        logits = []
        for peer in self.peers:
            peer.train(training)
            view = ModelView(model=peer, task="classification", logits=peer(**inputs).logits)
            logits.append(_class_logits(view, "peer", self.name))
        return logits

    def teacher_terms(self, z_teacher: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | float:
        """Extra loss each student/peer gets from the teacher (none for DML)."""
        return 0.0

    def forward(self, student, teacher, batch):
        z_s = _class_logits(student, "student", self.name)
        labels = _labels(batch, self.name)
        z_t = _class_logits(teacher, "teacher", self.name).detach() if self.requires.teacher else None
        models = [z_s, *self.peer_logits(batch, student.model.training)]
        t = self.temperature
        parts: dict[str, torch.Tensor] = {}
        total: torch.Tensor | float = 0.0
        for k, z_k in enumerate(models):
            others = [z_l.detach() for l, z_l in enumerate(models) if l != k]
            mutual = torch.stack([_kl_t(z_k, z_l, t) for z_l in others]).mean(0).mean()
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
    """Peer-to-peer mutual learning with a teacher (Niyaz & Bathula, arXiv 2110.11023).

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
        return _kl_t(z, z_teacher, self.teacher_temperature).mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", teacher_temperature={self.teacher_temperature}"

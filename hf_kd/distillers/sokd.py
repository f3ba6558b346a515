"""Semi-online knowledge distillation (SOKD; Liu et al., 2021, https://huggingface.co/papers/2111.11747, "Semi-Online
Knowledge Distillation"; code ``swlzq/Semi-Online-KD``).

The teacher stays frozen. A trainable *auxiliary branch* sits on top of it: a copy of its last ``k`` transformer
blocks and of its output head, fed by the teacher's (detached) hidden state entering block ``N - k + 1``. The branch
learns from the teacher (KD) and mutually from the student (DML); the student learns only from the branch, which
narrows the imitation gap.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from ..architecture import HeadKind, classifier_head, layers_path, run_layers, task_of, unwrap
from ..capture import ModelView, Requirements
from ..schedules import Knob
from .base import Distiller, register_distiller
from .divergences import tempered_kl


def _clone(value: Any, dtype: torch.dtype | None) -> Any:
    """Ordinary (non-inference, detached) copies of the tensors in ``value``; floating ones cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().clone()
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_clone(v, dtype) for v in value)
    if isinstance(value, list):
        return [_clone(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v, dtype) for k, v in value.items()}
    return value


@register_distiller("sokd")
class SOKDDistiller(Distiller):
    """Semi-online KD (SOKD; Liu et al., 2021, https://huggingface.co/papers/2111.11747): a trainable auxiliary branch
    on the frozen teacher, taught by the teacher and the student, teaches the student.

    With ``z_s``, ``z_t``, ``z_A`` the student, teacher and branch logits, ``sg`` stop-gradient and
    ``KL_tau(a, b) = tau^2 * KL(softmax(b / tau) || softmax(a / tau))`` averaged over samples::

        L_student = kd_weight * KL_tau(z_s, sg(z_A))
        L_branch  = branch_ce_weight * CE(y, z_A) + branch_teacher_weight * KL_tau(z_A, sg(z_t))
                    + branch_student_weight * KL_tau(z_A, sg(z_s))

    and this distiller returns ``L_student + L_branch`` (the student's own cross-entropy is the trainer's hard
    loss). ``L_branch`` reaches only the branch and ``L_student`` only the student, so one backward trains both, as
    in the official code; ``weight`` scales the sum. Logged sub-terms: ``student_kd``, ``branch_ce``,
    ``branch_kd_teacher``, ``branch_kd_student`` and ``branch_accuracy`` (the branch's accuracy on the batch; in
    evaluation it appears as ``eval_loss/sokd/branch_accuracy``, the "improved teacher" SOKD reports).

    The branch is a deep copy of the teacher's last ``k`` blocks and output head (BERT: pooler + dropout +
    classifier; ViT: final layernorm + classifier on the class token; Llama-family sequence classifiers: final norm
    + score at the last non-padding token), in fp32, a submodule of this distiller: trained in the distillers' param
    group, saved in ``distillers.pt``, never exported. Its input is the teacher's hidden state entering block
    ``N - k + 1``, detached; the blocks are called with the exact arguments that teacher block received (attention
    mask, position embeddings, ...), recorded by a forward pre-hook on that teacher block that exists only during
    the teacher's forward (``teacher_forward_context``). The teacher itself stays frozen and runs without autograd.

    Differences from the official code: the branch starts from the teacher's *trained* blocks,
    so at step 0 it reproduces the teacher's logits; the official code deep-copies an auxiliary stage of the
    vanilla checkpoint that was never trained. The teacher runs in eval mode (the official code runs it in train
    mode, so its BN statistics drift); the branch runs in train mode (dropout) while the student trains. The paper
    uses CNNs and "the last stage"; here the stage is ``k`` transformer blocks (default 1).

    Args:
        weight: Factor of the whole loss (number or schedule).
        k: Number of the teacher's last blocks copied into the branch (``1 <= k <= N``).
        temperature: ``tau`` of every KL term (SOKD: 4).
        kd_weight: ``lambda_kd`` of the student's term.
        branch_ce_weight, branch_teacher_weight, branch_student_weight: ``lambda`` of the branch's three terms.
    """

    family = "online"

    requires = Requirements(logits=True, labels=True)

    def __init__(
        self,
        weight: Knob = 1.0,
        k: int = 1,
        temperature: Knob = 4.0,
        kd_weight: Knob = 1.0,
        branch_ce_weight: Knob = 1.0,
        branch_teacher_weight: Knob = 1.0,
        branch_student_weight: Knob = 1.0,
    ) -> None:
        super().__init__(weight)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"sokd: `k` (teacher blocks in the branch) must be an integer >= 1, got {k!r}.")
        self.k = k
        self.temperature = self.schedulable("temperature", temperature, positive=True)
        self.kd_weight = self.schedulable("kd_weight", kd_weight)
        self.branch_ce_weight = self.schedulable("branch_ce_weight", branch_ce_weight)
        self.branch_teacher_weight = self.schedulable("branch_teacher_weight", branch_teacher_weight)
        self.branch_student_weight = self.schedulable("branch_student_weight", branch_student_weight)
        self.branch = nn.ModuleDict()
        self.head_kind: HeadKind | None = None
        self.pad_token_id: int | None = None
        self._captured: dict[str, Any] = {}  # the last call of the recorded teacher block: args, kwargs
        self._recorded_block: list[nn.Module] = []  # a list, so the teacher block is not a submodule

    # ---- building ----------------------------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().setup(student, teacher)
        if teacher is None:
            raise ValueError("sokd builds its auxiliary branch from the teacher: pass `teacher_model=`.")
        teacher = unwrap(teacher)
        self.head_kind, head = self.resolve_head(teacher)
        layers = teacher.get_submodule(layers_path(teacher))
        if self.k > len(layers):
            raise ValueError(f"sokd: `k`={self.k} but the teacher {type(teacher).__name__} has {len(layers)} blocks; "
                             f"set 1 <= k <= {len(layers)}.")
        start = len(layers) - self.k
        self.branch = nn.ModuleDict({
            "layers": copy.deepcopy(nn.ModuleList(layers[start:])),
            "head": copy.deepcopy(nn.ModuleDict(head)),
        }).float().requires_grad_(True)
        self.pad_token_id = getattr(getattr(teacher, "config", None), "pad_token_id", None)
        self._recorded_block = [layers[start]]

    @staticmethod
    def resolve_head(teacher: nn.Module) -> tuple[HeadKind, dict[str, nn.Module]]:
        """The teacher's output head (:func:`~hf_kd.architecture.classifier_head`), or an error naming what works."""
        found = classifier_head(teacher)
        if found is not None:
            return found
        name = type(teacher).__name__
        if task_of(teacher) != "classification":
            raise ValueError(
                f"sokd builds its auxiliary branch from a classifier's head; the teacher is {name} "
                f"({task_of(teacher)}). Supported: BERT-family *ForSequenceClassification, ViTForImageClassification "
                f"and Llama-family *ForSequenceClassification teachers."
            )
        raise ValueError(
            f"sokd cannot tell which modules form the output head of {name} (it knows the BERT pooler + classifier, "
            f"the ViT final layernorm + classifier on the class token, and the Llama-family final norm + score). Use "
            f"one of those teachers, or subclass SOKDDistiller and override `head_logits`."
        )

    @contextlib.contextmanager
    def teacher_forward_context(self, teacher: nn.Module, training: bool) -> Iterator[None]:
        """Record the arguments the teacher block where the branch starts receives, during the teacher forward."""

        def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._captured = {"args": args, "kwargs": kwargs}

        handle = self._recorded_block[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ---- the branch --------------------------------------------------------------------------------------------
    def branch_logits(self, teacher: ModelView, batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        """The branch's logits ``[B, C]`` on the hidden state the teacher's block ``N - k + 1`` received in the
        teacher forward that produced ``teacher`` (``batch`` supplies ``input_ids`` for last-token pooling)."""
        if not self._captured:
            raise RuntimeError("sokd: no teacher forward was recorded; call setup(student, teacher) before the "
                               "teacher's forward pass.")
        dtype = next(self.branch.parameters()).dtype
        args = _clone(list(self._captured["args"]), dtype)
        kwargs = _clone({k: v for k, v in self._captured["kwargs"].items() if not isinstance(v, Cache)}, dtype)
        output = run_layers(list(self.branch["layers"]), args, kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        return self.head_logits(hidden, batch or {})

    def head_logits(self, hidden: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits from the branch's last hidden state ``[B, T, H]`` through the copied head."""
        head = self.branch["head"]
        if self.head_kind == "pooler":
            return head["classifier"](head["dropout"](head["pooler"](hidden)))
        if self.head_kind == "cls_norm":
            return head["classifier"](head["norm"](hidden)[:, 0])
        logits = head["score"](head["norm"](hidden))
        input_ids = batch.get("input_ids")
        if input_ids is None or self.pad_token_id is None:
            last = torch.full((logits.shape[0],), -1, device=logits.device, dtype=torch.long)
        else:
            non_pad = (input_ids != self.pad_token_id).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device) * non_pad).argmax(-1)
        return logits[torch.arange(logits.shape[0], device=logits.device), last]

    # ---- the loss ----------------------------------------------------------------------------------------------
    def forward(self, student: ModelView, teacher: ModelView, batch: Mapping[str, Any]):
        self.branch.train(student.model.training)
        try:
            z_a = self.branch_logits(teacher, batch)
        finally:
            self._captured = {}
        z_s, z_t = student.logits.float(), teacher.logits.float().detach()
        tau = self.temperature
        parts = {"student_kd": tempered_kl(z_s, z_a.detach(), tau).mean(),
                 "branch_kd_teacher": tempered_kl(z_a, z_t, tau).mean(),
                 "branch_kd_student": tempered_kl(z_a, z_s.detach(), tau).mean()}
        labels = batch.get("labels")
        if labels is not None:
            labels = labels.to(z_a.device)
            parts["branch_ce"] = F.cross_entropy(z_a, labels)
            parts["branch_accuracy"] = (z_a.detach().argmax(-1) == labels).float().mean()
        ce = parts.get("branch_ce", torch.zeros((), device=z_a.device))
        loss = (self.kd_weight * parts["student_kd"] + self.branch_ce_weight * ce
                + self.branch_teacher_weight * parts["branch_kd_teacher"]
                + self.branch_student_weight * parts["branch_kd_student"])
        return loss, parts

    def extra_repr(self) -> str:
        return f"weight={self.weight}, k={self.k}, temperature={self.temperature}, head={self.head_kind}"

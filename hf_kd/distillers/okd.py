"""OKD: online knowledge distillation with online modules in the teacher (Rao et al.,
https://huggingface.co/papers/2409.12512).

Small trainable modules (here: peft adapters, LoRA by default) are injected **in place** into the frozen teacher of
a causal LM and trained together with the student; the teacher's own weights never change. No sampling from the
student is needed (fixed data, token-level losses).

**Loss (unverified; no code was released).** With ``p_T'`` the adapted teacher, ``p_S`` the student, ``sg`` stop
gradient and ``D`` a divergence (forward KL by default, or DistiLLM's skew KL), per valid token (causal shift,
``labels == -100`` ignored, averaged over the valid tokens like every logit distiller)::

    student:  L_S   = T^2 * D(sg(p_T'^T) || p_S^T)
    modules:  L_phi = module_ce_weight * CE(y, p_T') + module_weight * T^2 * D(sg(p_S^T) || p_T'^T)

The distiller returns ``L_S + L_phi`` per token. Because of the stop gradients, the student gets gradients only from
``L_S`` and the adapters only from ``L_phi`` (so ``weight`` scales both; the two losses are summed, not alternated).
The student's own cross-entropy is the trainer's ``hard_label_weight`` term. It runs in the trainer's shared chunked
row pass, which logs one value per distiller (``loss/okd``, the sum); the two sides are not logged separately.

The adapters are declared in ``teacher_parameters()``: the trainer unfreezes them, runs the teacher with autograd
(the fused-head path is off then), trains them in their own param group (``teacher_learning_rate``) and saves them in
``teacher_trained.pt`` with every checkpoint. ``save_model`` exports the plain student only. The adapted teacher's
adapters can be exported with ``save_teacher_adapters(dir)`` (peft format, loadable with
``PeftModel.from_pretrained(base_teacher, dir)``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import inject_adapters
from ..capture import Requirements
from ..choices import check_choice
from ..schedules import Knob
from . import divergences
from .base import register_distiller
from .logit import LogitDistiller

Divergence = Literal["kl", "skew_kl"]


@register_distiller("okd")
class OKDDistiller(LogitDistiller):
    """OKD (Rao et al., https://huggingface.co/papers/2409.12512): peft adapters in the teacher learn beside the
    student.

    Args:
        weight: Factor of the summed loss ``L_S + L_phi`` (number or schedule).
        temperature: ``T`` of the two divergences (both multiplied by ``T^2``); the module CE uses ``T = 1``.
        divergence: ``"kl"`` (forward KL, default) or ``"skew_kl"`` (``alpha``-skewed, DistiLLM).
        alpha: Skew of ``"skew_kl"``.
        module_weight: ``lambda``: weight of ``D(sg(p_S) || p_T')`` in the adapters' loss.
        module_ce_weight: Weight of ``CE(y, p_T')`` in the adapters' loss (keeps the teacher competent).
        peft_config: A dict of ``peft.LoraConfig`` options (default ``r=8, lora_alpha=16``; ``target_modules``
            defaults to peft's choice for the architecture, or ``"all-linear"``), or any ``peft.PeftConfig``.
        adapter_name: Name of the injected adapter.
    Causal LMs with labels; the vocabularies must match (shared prefix when padded).
    """

    family = "online"

    requires = Requirements(logits=True, labels=True)
    teacher_train_mode = False  # adapters are trained with the teacher in eval mode (no dropout)

    def __init__(
        self,
        weight: Knob = 1.0,
        temperature: Knob = 1.0,
        divergence: Divergence = "kl",
        alpha: float = 0.1,
        module_weight: float = 1.0,
        module_ce_weight: float = 1.0,
        peft_config: Mapping[str, Any] | Any | None = None,
        adapter_name: str = "okd",
    ) -> None:
        super().__init__(weight, temperature)
        check_choice("okd", "divergence", divergence, Divergence)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"okd: `alpha` (skew) must lie in [0, 1), got {alpha}.")
        if module_weight < 0 or module_ce_weight < 0:
            raise ValueError(
                f"okd: `module_weight` and `module_ce_weight` must be >= 0, got {module_weight}, {module_ce_weight}."
            )
        self.divergence_name, self.alpha = divergence, alpha
        self.module_weight, self.module_ce_weight = module_weight, module_ce_weight
        self.peft_config, self.adapter_name = peft_config, adapter_name
        self._teacher: list[nn.Module] = []  # a list: the teacher is not a submodule (not in distillers.pt)
        self._adapter_params: list[nn.Parameter] = []

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("okd trains adapters inside the teacher, so it needs `teacher_model=`.")
        config = getattr(teacher, "config", None)
        if config is not None and getattr(config, "is_encoder_decoder", False):
            raise ValueError("okd is for decoder-only causal LMs (AutoModelForCausalLM).")
        params = inject_adapters(teacher, self.peft_config, self.adapter_name, "okd")
        self._teacher = [teacher]
        self._adapter_params = params

    def teacher_parameters(self):
        return list(self._adapter_params)

    # ---- loss ----------------------------------------------------------------------------------------------------
    def _divergence(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``D(p_teacher || p_student)`` per row on temperature-scaled logits (roles as in :mod:`.divergences`)."""
        if self.divergence_name == "skew_kl":
            return divergences.skew_kl(student, teacher, self.alpha)
        return divergences.forward_kl(student, teacher)

    def student_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``T^2 * D(sg(p_T') || p_S)`` per row: gradients reach the student only."""
        return divergences.tempered(self._divergence, student, teacher.detach(), self.temperature)

    def module_term(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``ce_w * CE(y, p_T') + lambda * T^2 * D(sg(p_S) || p_T')`` per row: gradients reach the teacher only."""
        loss = self.module_weight * divergences.tempered(self._divergence, teacher, student.detach(), self.temperature)
        if self.module_ce_weight:
            loss = loss + self.module_ce_weight * F.cross_entropy(teacher, targets, reduction="none")
        return loss

    def row_loss(self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("okd needs the teacher's logits.")
        if targets is None:
            raise ValueError("okd needs `labels` in every batch (the module loss has a cross-entropy term).")
        return self.student_term(student, teacher) + self.module_term(student, teacher, targets)

    # ---- export --------------------------------------------------------------------------------------------------
    def teacher_adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters in peft's format (``get_peft_model_state_dict``; keys without the adapter name)."""
        from peft import get_peft_model_state_dict

        teacher = self._require_teacher()
        return get_peft_model_state_dict(teacher, adapter_name=self.adapter_name)

    def save_teacher_adapters(self, directory: str | os.PathLike) -> None:
        """Save the adapted teacher's adapters in peft's layout (``adapter_config.json`` +
        ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base_teacher, directory)``."""
        from safetensors.torch import save_file

        teacher = self._require_teacher()
        os.makedirs(directory, exist_ok=True)
        state = {
            f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in self.teacher_adapter_state_dict().items()
        }
        save_file(state, os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = teacher.peft_config[self.adapter_name]
        if getattr(config, "base_model_name_or_path", None) is None:
            config.base_model_name_or_path = getattr(getattr(teacher, "config", None), "_name_or_path", None) or None
        config.save_pretrained(directory)

    def _require_teacher(self) -> nn.Module:
        if not self._teacher:
            raise RuntimeError("okd: call setup() (done by DistillationTrainer) before exporting the adapters.")
        return self._teacher[0]

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, temperature={self.temperature}, divergence={self.divergence_name!r}, "
            f"module_weight={self.module_weight}, module_ce_weight={self.module_ce_weight}"
        )

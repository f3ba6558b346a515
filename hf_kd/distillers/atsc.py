"""ATSC: adaptive teaching with a shared classifier (https://huggingface.co/papers/2406.08528; code
``random2314235/ATSC``).

SimKD-style: the student predicts through the *teachers'* classifiers, reached through one projector per teacher
applied to the student's pooled feature. Unlike SimKD the teachers keep adapting toward the student, under an L2
anchor that keeps their weights near their pretrained values.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import inject_adapters, lora_delta_norm
from ..architecture import find_module, task_of
from ..capture import FeatureSpec, ModelView, Requirements
from ..choices import check_choice
from ..projectors import build_projector
from ..schedules import Knob
from .base import Distiller, register_distiller

Adaptation = Literal["full", "lora", "none"]
Projector = Literal["linear", "mlp"]
Combine = Literal["average", "learned"]
SHARED_CLASSIFIER_WEIGHTS = "atsc_shared_classifier.safetensors"
SHARED_CLASSIFIER_CONFIG = "atsc_shared_classifier.json"


def shared_logits(
    features: torch.Tensor, projectors: Sequence[nn.Module], heads: Sequence[nn.Linear], mixing: torch.Tensor
) -> torch.Tensor:
    """``z = sum_k alpha_k (W_k P_k(f) + b_k)``: the prediction through the shared classifiers (``alpha = mixing``)."""
    total = None
    for alpha, projector, head in zip(mixing, projectors, heads):
        projected = projector(features.to(_dtype(projector, features)))
        logits = alpha * F.linear(projected.to(head.weight.dtype), head.weight, head.bias).float()
        total = logits if total is None else total + logits
    return total


def _dtype(module: nn.Module, fallback: torch.Tensor) -> torch.dtype:
    return next((p.dtype for p in module.parameters()), fallback.dtype)


class SharedClassifier(nn.Module):
    """The exported prediction path of an ATSC student with a non-linear projector: it takes the place of the
    student's classifier (``classifier = SharedClassifier(...)``) and owns copies of the projectors, the adapted
    teachers' heads and the mixing weights. Built by :func:`load_atsc_student`."""

    def __init__(self, projectors: nn.ModuleList, heads: nn.ModuleList, mixing: torch.Tensor) -> None:
        super().__init__()
        self.projectors, self.heads = projectors, heads
        self.register_buffer("mixing", mixing)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return shared_logits(features, self.projectors, self.heads, self.mixing).to(features.dtype)


@register_distiller("atsc")
class ATSCDistiller(Distiller):
    """ATSC, adaptive teaching with a shared classifier (Li et al., https://huggingface.co/papers/2406.08528), single-
    or multi-teacher, for classifiers whose head is a ``Linear`` named ``classifier`` (BERT-family
    ``*ForSequenceClassification``, ``ViTForImageClassification``).

    With ``f_s`` / ``f_t^k`` the inputs of the student's / teacher ``k``'s classifier (pooled features),
    ``W_k, b_k`` teacher ``k``'s classifier and ``K`` teachers (``teacher_model=[...]``; ATSC reads all of them),
    the student predicts through the shared classifiers::

        z = sum_k alpha_k (W_k P_k(f_s) + b_k)      P_k: d_s -> d_t^k, a projector per teacher (this distiller's)

    with ``alpha_k = 1/K`` (``combine="average"``, the paper's multi-teacher average; its exact form is
    unverified) or ``alpha = softmax(beta)``, ``beta`` learned from zeros (``combine="learned"``). The loss is::

        L = feature_weight * (1/K) sum_k MSE(P_k(f_s), f_t^k) + anchor_weight * sum_k sum_{W in teacher k} ||W - W0||^2

    **The hard loss is the trainer's.** During every ``compute_loss`` (training and evaluation with labels) a forward
    hook on the student's classifier replaces its output with ``z``, so the student's logits *are* the
    shared-classifier logits and the trainer's ``hard_label_weight * CE(y, logits)`` is ``CE(y, z)``: it trains the
    projectors, the student, the mixing weights and the adapted teacher heads. The official README flags
    ``-c 0 -d 0 -b 1 -w 1`` put CE and KD on the student's *own* head, which ATSC never uses for its prediction; so
    ``feature_weight=1, anchor_weight=1`` are ``-b 1 -w 1`` and ``hard_label_weight=0`` reproduces ``-c 0``.

    **Export.** ``projector="linear"`` (default): ``z`` is linear in ``f_s``, so after :meth:`setup` and after every
    optimizer step the shared path is folded exactly into the student's own classifier
    (``W_s <- sum_k alpha_k W_k W_Pk``, ``b_s <- sum_k alpha_k (W_k b_Pk + b_k)``): ``save_model`` writes a plain
    ``AutoModelFor*Classification`` whose logits are ``z``, and ``predict`` without labels gives ``z`` too.
    ``projector="mlp"`` (Linear-GELU-Linear): no fold exists, so the hook stays on the student for good (training,
    evaluation, ``predict``), and ``save_model`` also writes ``atsc_shared_classifier.safetensors`` + ``.json``
    beside the student's weights; :func:`load_atsc_student` loads that folder with the shared classifier in place of
    the student's (a plain ``from_pretrained`` would give the unused own head). Both need every teacher's number of
    classes equal to the student's ``num_labels``; :meth:`setup` overwrites the student's classifier in place.

    **Teacher adaptation** (the MSE is never detached on the teacher side, it also pulls ``f_t^k`` toward
    ``P_k(f_s)``):

    - ``"full"`` (default, as the official code): every teacher parameter trains (``teacher_learning_rate``), the
      teachers run in train mode, the anchor covers every parameter with ``dim() > 1`` (biases and LayerNorm are
      free; the classifier weight is anchored). ``W0`` are frozen copies held as buffers of this distiller, so
      memory and ``distillers.pt`` grow by about one copy of each teacher.
    - ``"lora"``: peft LoRA adapters (``peft_config``, default ``r=8, lora_alpha=16`` on peft's target modules for
      the architecture) are injected into each teacher and only they train; base weights never change, teachers
      stay in eval mode. The anchor is the same ``||W - W0||^2`` of the adapted weights, ``sum ||s B A||_F^2``,
      with no copies. The teachers' classifier heads stay as they are unless ``target_modules`` includes them.
    - ``"none"``: the teachers stay frozen (SimKD with a linear or MLP projector); the anchor is 0.

    Not implemented: the official second step (CE on the teacher's logits, stepping only its FC bias) and the
    official conv bottleneck projector (pooled transformer features use a ``Linear`` or MLP).

    Args:
        weight: Factor of the whole loss (number or schedule).
        feature_weight: Factor of the feature MSE (official ``-b``).
        anchor_weight: Factor of the L2 anchor (official ``-w``).
        teacher_adaptation: ``"full"``, ``"lora"`` or ``"none"``.
        projector: ``"linear"`` (exact fold into the student's head) or ``"mlp"``.
        combine: ``"average"`` or ``"learned"`` mixing of the teachers' predictions.
        peft_config: ``teacher_adaptation="lora"`` only: a dict of ``peft.LoraConfig`` options or a ``PeftConfig``.
        head_module: Dotted name of the classifier ``Linear`` in the student and every teacher.

    Logged sub-terms: ``mse`` and ``anchor`` (unweighted).
    """

    family = "online"

    requires = Requirements()
    multi_teacher = True

    def __init__(
        self,
        weight: Knob = 1.0,
        feature_weight: Knob = 1.0,
        anchor_weight: Knob = 1.0,
        teacher_adaptation: Adaptation = "full",
        projector: Projector = "linear",
        combine: Combine = "average",
        peft_config: Mapping[str, Any] | Any | None = None,
        head_module: str = "classifier",
    ) -> None:
        super().__init__(weight)
        self.feature_weight = self.schedulable("feature_weight", feature_weight)
        self.anchor_weight = self.schedulable("anchor_weight", anchor_weight)
        for option, value, valid in (("teacher_adaptation", teacher_adaptation, Adaptation),
                                     ("projector", projector, Projector), ("combine", combine, Combine)):
            check_choice("atsc", option, value, valid)
        if peft_config is not None and teacher_adaptation != "lora":
            raise ValueError("atsc: `peft_config` is used with teacher_adaptation='lora' only.")
        if not isinstance(head_module, str) or not head_module:
            raise ValueError(f"atsc: `head_module` must be a dotted module name, got {head_module!r}.")
        self.teacher_adaptation, self.projector_kind, self.combine = teacher_adaptation, projector, combine
        self.peft_config, self.head_module = peft_config, head_module
        self.adapter_name = "atsc"
        self.teacher_train_mode = teacher_adaptation == "full"
        self.projectors = nn.ModuleList()
        self.mixing_logits: nn.Parameter | None = None  # beta of combine="learned"
        # Plain lists: the models' modules and parameters are not distiller state.
        self._student_head: list[nn.Linear] = []
        self._teacher_heads: list[nn.Linear] = []
        self._teachers: list[nn.Module] = []
        self._teacher_params: list[nn.Parameter] = []
        self._anchored: list[tuple[nn.Parameter, str]] = []  # (teacher parameter, name of its W0 buffer)
        self._permanent_hook = None

    # ---- setup --------------------------------------------------------------------------------------------------
    def _head(self, model: nn.Module, role: str) -> nn.Linear:
        try:
            head = find_module(model, self.head_module)
        except ValueError as error:
            raise ValueError(
                f"atsc needs a classifier head: the student predicts through the teachers' classifiers. {error} "
                f"({role}: {type(model).__name__}, task {task_of(model)!r}). Use classifiers (e.g. "
                f"AutoModelForSequenceClassification), or set `head_module` to the name of their linear classifier."
            ) from None
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"atsc: the {role}'s `{self.head_module}` is {type(head).__name__}, not nn.Linear. ATSC shares a "
                "linear classifier (BERT-family *ForSequenceClassification, ViTForImageClassification); set "
                "`head_module` to the dotted name of the linear classifier."
            )
        return head

    def setup(self, student: nn.Module, teachers: Sequence[nn.Module]) -> None:
        if not teachers:
            raise ValueError("atsc predicts through the teachers' classifiers, so it needs `teacher_model=`.")
        s_head = self._head(student, "student")
        t_heads = [self._head(t, f"teacher {k}") for k, t in enumerate(teachers)]
        for k, t_head in enumerate(t_heads):
            if s_head.out_features != t_head.out_features:
                raise ValueError(
                    f"atsc: the student predicts through teacher {k}'s classifier, so both need the same number of "
                    f"classes: the teacher's `{self.head_module}` has {t_head.out_features} outputs, the "
                    f"student's {s_head.out_features}. Load the student with num_labels={t_head.out_features}."
                )
            if (s_head.bias is None) != (t_head.bias is None):
                raise ValueError("atsc: the student's and the teachers' classifiers must all have a bias or none.")
        self._student_head, self._teacher_heads, self._teachers = [s_head], t_heads, list(teachers)
        device = s_head.weight.device
        self.projectors = nn.ModuleList(
            build_projector(s_head.in_features, t.in_features, self.projector_kind) for t in t_heads
        ).to(device)
        if self.combine == "learned":
            self.mixing_logits = nn.Parameter(torch.zeros(len(teachers), device=device))
        self._setup_adaptation(teachers)
        if self.projector_kind == "linear":
            self.fold()
        elif self._permanent_hook is None:
            self._permanent_hook = s_head.register_forward_hook(self._replace_output)

    def _setup_adaptation(self, teachers: Sequence[nn.Module]) -> None:
        self._anchored, self._teacher_params = [], []
        if self.teacher_adaptation == "full":
            for k, teacher in enumerate(teachers):
                self._teacher_params += list(teacher.parameters())
                for index, (name, param) in enumerate(teacher.named_parameters()):
                    if param.dim() > 1:
                        buffer = f"anchor_{k}_{index}_" + name.replace(".", "_")
                        self.register_buffer(buffer, param.detach().clone())
                        self._anchored.append((param, buffer))
        elif self.teacher_adaptation == "lora":
            for teacher in teachers:
                self._teacher_params += inject_adapters(teacher, self.peft_config, self.adapter_name, "atsc")

    def teacher_parameters(self):
        return list(self._teacher_params)

    def student_features(self):
        return (FeatureSpec(self.head_module, "input"),)

    def teacher_features(self):
        return (FeatureSpec(self.head_module, "input"),)

    # ---- the shared classifier --------------------------------------------------------------------------------
    def mixing(self) -> torch.Tensor:
        """``alpha``: ``1/K`` each, or ``softmax(beta)``."""
        if self.mixing_logits is not None:
            return self.mixing_logits.softmax(-1)
        count = len(self.projectors)
        return torch.full((count,), 1.0 / count, device=self._student_head[0].weight.device)

    def shared_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``z`` from the student's pooled feature (autograd into the projectors, the student, the mixing weights
        and the teachers' heads)."""
        return shared_logits(features, self.projectors, self._teacher_heads, self.mixing())

    def _replace_output(self, module, args, output):
        return self.shared_logits(args[0]).to(output.dtype)

    @contextlib.contextmanager
    def _shared_head(self) -> Iterator[None]:
        handle = self._student_head[0].register_forward_hook(self._replace_output)
        try:
            yield
        finally:
            handle.remove()

    def student_forward_context(self, student: nn.Module, training: bool):
        # Training and evaluation alike: the student's logits are the shared-classifier logits (with an MLP
        # projector the permanent hook already does it).
        return self._shared_head() if self._permanent_hook is None else contextlib.nullcontext()

    @torch.no_grad()
    def fold(self) -> None:
        """Write the shared path into the student's classifier (linear projectors only)::

        W_s = sum_k alpha_k W_k W_Pk,   b_s = sum_k alpha_k (W_k b_Pk + b_k)
        """
        s_head = self._student_head[0]
        device = s_head.weight.device
        weight = torch.zeros(s_head.weight.shape, device=device)
        bias = torch.zeros(s_head.out_features, device=device)
        for alpha, projector, head in zip(self.mixing(), self.projectors, self._teacher_heads):
            w_t = head.weight.detach().to(device, torch.float32)
            weight += alpha * (w_t @ projector.weight.detach().to(device, torch.float32))
            bias += alpha * (w_t @ projector.bias.detach().to(device, torch.float32))
            if head.bias is not None:
                bias += alpha * head.bias.detach().to(device, torch.float32)
        s_head.weight.copy_(weight)
        if s_head.bias is not None:
            s_head.bias.copy_(bias)

    def on_step_end(self) -> None:
        if self.projector_kind == "linear":
            self.fold()

    # ---- the loss -----------------------------------------------------------------------------------------------
    def anchor(self) -> torch.Tensor:
        """``sum_k sum_{W in teacher k, W.dim() > 1} ||W - W0||^2`` (the LoRA deltas' norms with ``"lora"``; 0 with
        ``"none"``)."""
        total = torch.zeros((), device=self._student_head[0].weight.device)
        for param, buffer in self._anchored:
            total = total + (param.float() - getattr(self, buffer).float()).pow(2).sum().to(total.device)
        if self.teacher_adaptation == "lora":
            for teacher in self._teachers:
                total = total + lora_delta_norm(teacher, self.adapter_name).to(total.device)
        return total

    def forward(self, student: ModelView, teachers: Sequence[ModelView], batch: Mapping[str, Any]):
        spec = FeatureSpec(self.head_module, "input")
        f_s = student.features[spec]
        mse = torch.stack([
            F.mse_loss(projector(f_s.to(_dtype(projector, f_s))).float(), teacher.features[spec].float())
            for projector, teacher in zip(self.projectors, teachers)
        ]).mean()  # f_t not detached: the teachers adapt toward P_k(f_s)
        anchor = self.anchor()
        loss = self.feature_weight * mse + self.anchor_weight * anchor
        return loss, {"mse": mse.detach(), "anchor": anchor.detach()}

    # ---- export -------------------------------------------------------------------------------------------------
    def on_save(self, output_dir: str) -> None:
        """With an MLP projector, write the shared classifier (projectors, adapted heads, mixing weights) beside the
        student's weights; :func:`load_atsc_student` reads it back."""
        if self.projector_kind == "linear":
            return
        from safetensors.torch import save_file

        state = {f"projectors.{k}": v for k, v in self.projectors.state_dict().items()}
        for k, head in enumerate(self._teacher_heads):
            state.update({f"heads.{k}.{n}": p for n, p in head.state_dict().items()})
        state["mixing"] = self.mixing()
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
                  os.path.join(output_dir, SHARED_CLASSIFIER_WEIGHTS))
        config = {"head_module": self.head_module, "projector": self.projector_kind,
                  "in_features": self._student_head[0].in_features,
                  "teacher_features": [h.in_features for h in self._teacher_heads],
                  "num_labels": self._student_head[0].out_features,
                  "bias": self._student_head[0].bias is not None}
        with open(os.path.join(output_dir, SHARED_CLASSIFIER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    def extra_repr(self) -> str:
        return (
            f"weight={self.weight}, feature_weight={self.feature_weight}, anchor_weight={self.anchor_weight}, "
            f"teacher_adaptation={self.teacher_adaptation!r}, projector={self.projector_kind!r}, "
            f"combine={self.combine!r}, head_module={self.head_module!r}"
        )


def load_atsc_student(path: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a student exported by ATSC with ``projector="mlp"``: ``model_class.from_pretrained(path, **kwargs)``
    (default ``AutoModelForSequenceClassification``; use ``AutoModelForImageClassification`` for ViTs) with its
    classifier replaced by the saved :class:`SharedClassifier`, so its logits are the shared-classifier logits the
    trainer evaluated. A folder without the shared classifier (linear projector: already folded) loads as is."""
    from safetensors.torch import load_file

    if model_class is None:
        from transformers import AutoModelForSequenceClassification as model_class
    model = model_class.from_pretrained(path, **kwargs)
    config_path = os.path.join(path, SHARED_CLASSIFIER_CONFIG)
    if not os.path.isfile(config_path):
        return model
    with open(config_path) as f:
        config = json.load(f)
    projectors = nn.ModuleList(build_projector(config["in_features"], d, config["projector"])
                               for d in config["teacher_features"])
    heads = nn.ModuleList(nn.Linear(d, config["num_labels"], bias=config["bias"]) for d in config["teacher_features"])
    state = load_file(os.path.join(path, SHARED_CLASSIFIER_WEIGHTS))
    shared = SharedClassifier(projectors, heads, torch.empty(len(heads)))
    shared.load_state_dict(state)
    old_head = find_module(model, config["head_module"])
    shared.to(device=old_head.weight.device, dtype=old_head.weight.dtype)
    parent_name, _, child = config["head_module"].rpartition(".")
    setattr(find_module(model, parent_name) if parent_name else model, child, shared)
    return model

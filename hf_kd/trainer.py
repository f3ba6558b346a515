"""``DistillationTrainer``: ``transformers.Trainer`` with a teacher and a list of distillers.

One training step (see ``design.md``)::

    loss = hard_label_weight * student_loss + sum_i weight_i(step) * distiller_i(student_view, teacher_view, batch)

The trainer knows no method by name. It asks the distillers what they read (``requires``) and captures only that;
distillers with a per-row loss on logits (``row_loss``) share one chunked pass over samples/tokens
(:mod:`hf_kd.row_loss`); the others are called with the two :class:`~hf_kd.capture.ModelView`s.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ModelOutput

from .arguments import DistillationArguments
from .callbacks import ScheduleCallback
from .capture import (
    NOT_MODEL_INPUTS,
    ModelView,
    Requirements,
    capture_features,
    capture_head_input,
    model_inputs,
    output_head,
    task_of,
    unwrap,
)
from .distillers.base import Distiller, build_distiller, ordered_union, teacher_of, weighted_losses
from .ledger import LossLedger
from .progressive import ProgressiveLayerCallback
from .row_loss import RowTerm, row_losses, rows_from_views
from .teachers import prepare_teacher, shared_logit_width

DISTILLER_STATE_NAME = "distillers.pt"
TEACHER_STATE_NAME = "teacher_trained.pt"


class DistillationTrainer(Trainer):
    """A ``Trainer`` that distils ``teacher_model`` into ``model`` (the student).

    Args:
        model: The student. Trained, saved and evaluated exactly as ``Trainer`` does.
        teacher_model: The teacher, or a list of teachers (each distiller reads the one at its ``teacher_index``, or
            all of them if it is a multi-teacher distiller such as ATSC). Frozen in place (``eval()``,
            ``requires_grad_(False)``) when the trainer is built, run without autograd, placed by Accelerate in
            ``args.teacher_dtype``. Never in the optimizer or in a saved checkpoint of the student; online distillers
            may declare teacher-side parameters to train (``Distiller.teacher_parameters``).
        args: ``DistillationArguments`` (``hard_label_weight``, ``distillers``, ``teacher_dtype``, ...).
        distillers: ``Distiller`` instances or dicts ``{"name": ..., **options}``; overrides ``args.distillers``.
        **kwargs: Every other ``Trainer`` argument (``train_dataset``, ``eval_dataset``, ``processing_class``,
            ``data_collator``, ``compute_metrics``, ``callbacks``, ``optimizers``, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: DistillationArguments | None = None,
        distillers: Sequence[Distiller | Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = DistillationArguments(output_dir="trainer_output")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"`args` must be hf_kd.DistillationArguments (it adds the distillation fields), got "
                f"{type(args).__name__}. Build it with DistillationArguments(output_dir=..., ...)."
            )
        if distillers is not None and args.distillers:
            raise ValueError("Distillers are given both as `distillers=` and in `args.distillers`; keep one of them.")
        specs = list(distillers) if distillers is not None else args.distillers
        if not specs:
            raise ValueError(
                "No distillers given. Pass `distillers=[{'name': 'kl', 'temperature': 2.0}]` (or set "
                "`DistillationArguments.distillers`); hf_kd.list_distillers() lists the names."
            )
        self.distillers = nn.ModuleList(build_distiller(spec) for spec in specs)
        self.distiller_keys = _unique_keys(self.distillers)
        self.requirements = _union(d.requires for d in self.distillers)
        teachers = _teacher_list(teacher_model)
        self._check_teacher_indices(len(teachers))
        callbacks = [*(kwargs.pop("callbacks", None) or []), ScheduleCallback(self.distillers), _StepEvents(self)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

        student = unwrap(self.model)
        self.teachers = [prepare_teacher(t, self.accelerator, args.teacher_torch_dtype) for t in teachers]
        self.teacher = self.teachers[0] if self.teachers else None  # the first (or only) teacher
        bare_teachers = [unwrap(t) for t in self.teachers]
        readers = [self._readers(index) for index in range(len(teachers))]
        self._check_outputs_available(student, bare_teachers)
        for teacher, reading in zip(bare_teachers, readers):
            if any(d.requires.logits for d in reading):
                shared_logit_width(student, teacher, self.processing_class)
        for distiller in self.distillers:
            distiller.setup(student, teacher_of(distiller, bare_teachers))
        self.distillers.to(args.device)
        self._student_features = ordered_union(d.student_features() for d in self.distillers)
        self._teacher_features = [ordered_union(d.teacher_features() for d in reading) for reading in readers]
        self._teachers_run = [bool(reading) for reading in readers]  # teachers some distiller reads
        if args.progressive_layers:
            self.add_callback(ProgressiveLayerCallback(self.distillers, self.distiller_keys, **args.progressive_layers))

        self._row_distillers = [(k, d) for k, d in zip(self.distiller_keys, self.distillers) if hasattr(d, "row_loss")]
        self._other_distillers = [
            (k, d) for k, d in zip(self.distiller_keys, self.distillers) if not hasattr(d, "row_loss")
        ]
        self._teacher_params = list(ordered_union(d.teacher_parameters() for d in self.distillers))
        for param in self._teacher_params:
            param.requires_grad_(True)
        self._teacher_trained = bool(self._teacher_params)
        trained = {id(p) for p in self._teacher_params}
        self._teacher_frozen = [not any(id(p) in trained for p in t.parameters()) for t in bare_teachers]
        self._teacher_train_mode = [any(d.teacher_train_mode for d in reading) for reading in readers]
        self._student_task = task_of(student)
        self._teacher_tasks = [task_of(t) for t in bare_teachers]
        self._fused_lm = (
            args.fused_lm_loss
            and bool(bare_teachers)
            and self._student_task == "causal_lm"
            and output_head(student) is not None
            and all(output_head(t) is not None for t in bare_teachers)
            and not self._teacher_trained
            and not any(d.requires.logits for _, d in self._other_distillers)
        )
        self._teacher_inputs = [_accepted_inputs(t) for t in bare_teachers]
        self.ledger = LossLedger()
        self._teacher_evaluated = False
        self._evaluating_teacher = False

    # ---- teachers ---------------------------------------------------------------------------------------------
    def _readers(self, index: int) -> list[Distiller]:
        """The distillers that read teacher ``index``."""
        return [d for d in self.distillers if d.requires.teacher and (d.multi_teacher or d.teacher_index == index)]

    def _check_teacher_indices(self, count: int) -> None:
        if self.requirements.teacher and count == 0:
            needing = [k for k, d in zip(self.distiller_keys, self.distillers) if d.requires.teacher]
            raise ValueError(f"Distillers {needing} need a teacher: pass `teacher_model=` to DistillationTrainer.")
        for key, distiller in zip(self.distiller_keys, self.distillers):
            if not distiller.requires.teacher:
                continue
            if not distiller.multi_teacher and distiller.teacher_index >= count:
                raise ValueError(
                    f"Distiller {key!r} reads teacher {distiller.teacher_index} (its `teacher` option), but "
                    f"`teacher_model` has {count} teacher(s); use an index below {count}."
                )
            if distiller.multi_teacher and hasattr(distiller, "row_loss"):
                raise TypeError(f"Distiller {key!r}: multi-teacher distillers implement forward(), not row_loss().")

    # ---- checks made before the first step -------------------------------------------------------------------
    def _check_outputs_available(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        if not self.requirements.attentions:
            return
        roles = [("student", student)] + [(f"teacher {i}" if len(teachers) > 1 else "teacher", t)
                                          for i, t in enumerate(teachers)]
        for role, model in roles:
            implementation = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
            if implementation != "eager":
                raise ValueError(
                    f"A distiller reads attention maps, but the {role} uses attn_implementation="
                    f"{implementation!r}, which returns none. Load it with "
                    f"from_pretrained(..., attn_implementation='eager')."
                )

    def _check_batch(self, inputs: Mapping[str, Any]) -> None:
        if "labels" in inputs:
            return
        if self.args.hard_label_weight > 0 and not self._evaluating_teacher:
            raise ValueError(
                f"hard_label_weight={self.args.hard_label_weight} but the batch has no `labels`. Set "
                "hard_label_weight=0 for pure distillation, or give the batch labels (e.g. a `label` column, or "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LMs)."
            )
        if self.requirements.labels:
            needing = [k for k, d in zip(self.distiller_keys, self.distillers) if d.requires.labels]
            raise ValueError(f"Distillers {needing} need `labels` in every batch, and this batch has none.")

    # ---- the loss --------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        if self._evaluating_teacher:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._check_batch(inputs)
        training = model.training and torch.is_grad_enabled()
        fused = self._fused_lm and training
        hard_weight = self.args.hard_label_weight
        want_hard = hard_weight > 0 and "labels" in inputs
        hard_as_row = want_hard and self._hard_loss_is_cross_entropy(inputs)

        student, outputs = self._student_forward(
            model, inputs, fused, want_hard and not hard_as_row, num_items_in_batch
        )
        teachers = [
            self._teacher_forward(index, inputs, fused, training) if run else None
            for index, run in enumerate(self._teachers_run)
        ]

        components: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        if student.loss is not None:  # the model's own loss, already scaled like Trainer's loss
            components["hard"] = student.loss
            total = total + hard_weight * student.loss

        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        distill_total, values = self._distiller_losses(
            student, teachers, inputs, hard_as_row, num_items_in_batch if scaled_for_ga else None
        )
        loss_scale = self._loss_scale(num_items_in_batch)
        total = total + loss_scale * distill_total
        components.update({name: value * loss_scale for name, value in values.items()})
        self._record(model, components, total, inputs, num_items_in_batch)
        if return_outputs:
            return total, DistillationOutput(loss=total.detach(), logits=outputs.logits)
        return total

    def _hard_loss_is_cross_entropy(self, inputs) -> bool:
        """Whether the student's own loss is plain (label-smoothed) cross-entropy on its logits.

        Then it is computed in the shared row pass, normalised exactly like the distillers (the models' own losses
        do not all honour ``num_items_in_batch``). Otherwise (regression, multi-label, ``compute_loss_func``) the
        model's / Trainer's own loss is used.
        """
        if self.compute_loss_func is not None or self._student_task not in ("classification", "causal_lm"):
            return False
        labels = inputs["labels"]
        if self._student_task == "causal_lm":
            return True
        problem = getattr(unwrap(self.model).config, "problem_type", None)
        return labels.dim() == 1 and not labels.is_floating_point() and problem in (None, "single_label_classification")

    def _cross_entropy(self, student, teacher, targets):
        return F.cross_entropy(student, targets, reduction="none", label_smoothing=self.args.label_smoothing_factor)

    def _distiller_losses(self, student, teachers, inputs, hard_as_row, num_items):
        """``sum_i w_i * L_i`` over the distillers (plus the student's cross-entropy) and each ``L_i``.

        Row terms share one chunked pass per teacher they read (the student's cross-entropy joins the first).
        """
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        groups: dict[int | None, list[RowTerm]] = {}
        for key, distiller in self._row_distillers:
            groups.setdefault(distiller.teacher_index, []).append(RowTerm(key, distiller.row_loss, distiller.weight))
        if hard_as_row:
            groups.setdefault(next(iter(groups), None), []).insert(
                0, RowTerm("hard", self._cross_entropy, self.args.hard_label_weight)
            )
        for index, terms in groups.items():
            rows = rows_from_views(student, teachers[index] if index is not None else None, inputs)
            normalizer = num_items if num_items is not None else max(rows.rows.numel(), 1)
            group_total, group_values = row_losses(
                terms, rows.student, rows.teacher, rows.rows, rows.targets, rows.vocab_size, normalizer,
                self.args.loss_chunk_size,
            )
            total = total + group_total
            values.update(group_values)
        other_total, other_values = weighted_losses(self._other_distillers, student, teachers, inputs)
        return total + other_total, {**values, **other_values}

    def _loss_scale(self, num_items_in_batch) -> float:
        """The factor Trainer.compute_loss puts on a loss normalised over tokens of all processes."""
        if (
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
        return 1

    # ---- forward passes --------------------------------------------------------------------------------------
    def _output_flags(self) -> dict[str, bool]:
        flags = {}
        if self.requirements.hidden_states:
            flags["output_hidden_states"] = True
        if self.requirements.attentions:
            flags["output_attentions"] = True
        return flags

    def _student_forward(self, model, inputs, fused, model_loss, num_items_in_batch):
        bare = unwrap(model)
        flags = self._output_flags()
        head = output_head(bare) if fused else None
        hard = None
        training = model.training and torch.is_grad_enabled()
        with contextlib.ExitStack() as stack:
            for distiller in self.distillers:
                stack.enter_context(distiller.student_forward_context(bare, training))
            captured = stack.enter_context(capture_head_input(head)) if fused else {}
            features = stack.enter_context(capture_features(bare, self._student_features))
            if model_loss:  # Trainer's own loss path: label smoothing, compute_loss_func, token averaging
                hard, outputs = super().compute_loss(
                    model, {**inputs, **flags}, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            else:
                outputs = model(**model_inputs(inputs), **flags)
        view = _view(bare, self._student_task, outputs, captured.get("input"), head)
        view.loss, view.features = hard, features
        return view, outputs

    def _teacher_forward(self, index, inputs, fused, training) -> ModelView:
        teacher = self.teachers[index]
        bare = unwrap(teacher)
        if self._teacher_train_mode[index]:
            teacher.train(training)
        head = output_head(bare) if fused else None
        teacher_inputs = {k: v for k, v in inputs.items() if self._teacher_inputs[index](k)}
        frozen = self._teacher_frozen[index]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode() if frozen else contextlib.nullcontext())
            for distiller in self._readers(index):
                stack.enter_context(distiller.teacher_forward_context(bare, training))
            captured = stack.enter_context(capture_head_input(head)) if fused else {}
            features = stack.enter_context(capture_features(bare, self._teacher_features[index]))
            outputs = teacher(**teacher_inputs, **self._output_flags())
        view = _view(bare, self._teacher_tasks[index], outputs, captured.get("input"), head)
        view.features = features
        if frozen:  # inference tensors cannot be saved for backward: hand distillers ordinary tensors
            view.hidden_states = _autograd_safe(view.hidden_states)
            view.attentions = _autograd_safe(view.attentions)
            view.features = {spec: value.clone() for spec, value in features.items()}
            if view.logits is not None and view.logits.dim() == 2:
                view.logits = view.logits.clone()
        return view

    # ---- logging ---------------------------------------------------------------------------------------------
    def _record(self, model, components, total, inputs, num_items_in_batch) -> None:
        named = {f"loss/{name}": value for name, value in components.items()}
        if model.training and torch.is_grad_enabled():
            self.ledger.add_train({"loss": total, **named}, 1.0 / self._ga_divisor(num_items_in_batch),
                                  self.state.global_step)
        elif not model.training:
            self.ledger.add_eval(components, _batch_size(inputs))

    def _ga_divisor(self, num_items_in_batch) -> int:
        """What Trainer.training_step divides the loss by (mirrors its rule)."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return 1 if scaled else getattr(self, "current_gradient_accumulation_steps", 1)

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(value.reshape(1))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the components averaged over the same window as `loss`
            window = self.ledger.pop_window(self.state.global_step, self._gather)
            logs.update({k: v for k, v in window.items() if k != "loss"})
        super().log(logs, start_time)

    def _dispatch_step_losses(self, args, state, control) -> None:
        listeners = [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_distillation_step")]
        if not listeners:
            self.ledger.step = {}
            return
        losses = self.ledger.pop_step()
        for callback in listeners:
            result = callback.on_distillation_step(
                args, state, control, losses=losses, model=self.model, teacher_model=self.teacher
            )
            if result is not None:
                control = result

    # ---- evaluation ------------------------------------------------------------------------------------------
    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        for name, value in self.ledger.pop_eval(self._gather).items():
            output.metrics[f"{metric_key_prefix}_loss/{name}"] = value
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.args.teacher_eval_metrics and not self._teacher_evaluated:
            for index in range(len(self.teachers)):  # eval_teacher_* (one teacher) or eval_teacher<i>_*
                prefix = f"{metric_key_prefix}_teacher" + (str(index) if len(self.teachers) > 1 else "")
                metrics.update(self.evaluate_teacher(eval_dataset, ignore_keys, prefix, teacher_index=index))
        return metrics

    def evaluate_teacher(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval_teacher",
                         teacher_index: int = 0):
        """Evaluate teacher ``teacher_index`` alone with the trainer's data, collator and ``compute_metrics``."""
        if not self.teachers:
            raise ValueError("This trainer has no teacher to evaluate.")
        student, wrapped = self.model, self.model_wrapped
        self.model = self.model_wrapped = self.teachers[teacher_index]
        self._evaluating_teacher = True
        try:
            metrics = Trainer.evaluate(self, eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self.model, self.model_wrapped = student, wrapped
            self._evaluating_teacher = False
        self._teacher_evaluated = True
        return metrics

    # ---- optimizer and checkpoints ----------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        taken = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.distillers.parameters() if p.requires_grad and id(p) not in taken]
        if params:
            optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        teacher_params = [p for p in self._teacher_params if id(p) not in taken]
        if teacher_params:
            lr = self.args.teacher_learning_rate
            optimizer.add_param_group({"params": teacher_params, "weight_decay": self.args.weight_decay,
                                       "lr": self.args.learning_rate if lr is None else lr})
        return optimizer

    def online_parameters(self) -> list[nn.Parameter]:
        """Everything trained besides the student: distiller parameters and teacher-side parameters."""
        return [*self.distillers.parameters(), *self._teacher_params]

    def _trained_teacher_state(self) -> dict[str, torch.Tensor]:
        """The trained teacher-side parameters by name (``<teacher index>.<name>`` when there are several)."""
        trained = {id(p) for p in self._teacher_params}
        state = {}
        for index, teacher in enumerate(self.teachers):
            prefix = f"{index}." if len(self.teachers) > 1 else ""
            state.update({prefix + n: p.detach() for n, p in unwrap(teacher).named_parameters() if id(p) in trained})
        return state

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        for distiller in self.distillers:
            distiller.on_save(output_dir if output_dir is not None else self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        for name, state in ((DISTILLER_STATE_NAME, self.distillers.state_dict()),
                            (TEACHER_STATE_NAME, self._trained_teacher_state() if self._teacher_trained else {})):
            if state:
                torch.save(state, os.path.join(folder, name))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        # Runs on every resume, whatever the backend, so online state is restored next to the optimizer's.
        super()._load_optimizer_and_scheduler(checkpoint)
        if not checkpoint:
            return
        path = os.path.join(checkpoint, DISTILLER_STATE_NAME)
        if os.path.isfile(path):
            self.distillers.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        path = os.path.join(checkpoint, TEACHER_STATE_NAME)
        if os.path.isfile(path) and self._teacher_trained:
            saved = torch.load(path, map_location=self.args.device, weights_only=True)
            current = self._trained_teacher_state()
            if saved.keys() != current.keys():
                raise ValueError(
                    f"{path} holds teacher parameters {sorted(saved)}, but the distillers now train "
                    f"{sorted(current)}; resume with the same distillers."
                )
            with torch.no_grad():
                for name, value in saved.items():
                    current[name].copy_(value)


@dataclass
class DistillationOutput(ModelOutput):
    """What ``compute_loss(..., return_outputs=True)`` returns beside the loss: the total loss and the student's
    logits, whatever the student's own output class (hidden states and attentions are not passed to evaluation)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class _StepEvents(TrainerCallback):
    """The share of each optimizer step that Trainer only does for the student, for distiller and teacher-side
    parameters: averages their gradients over processes before the step, clears them after it, and sends
    ``on_distillation_step`` to the callbacks that define it.
    """

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        if accelerator.num_processes > 1:
            for param in self.trainer.online_parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.trainer.online_parameters():
            param.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._dispatch_step_losses(args, state, control)


def _view(model: nn.Module, task, outputs, head_input, head) -> ModelView:
    logits = None if head_input is not None else getattr(outputs, "logits", None)
    return ModelView(
        model=model,
        task=task,
        logits=logits,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
        head_input=head_input,
        head=head,
    )


def _teacher_list(teacher_model) -> list[nn.Module]:
    if teacher_model is None:
        return []
    if isinstance(teacher_model, nn.Module):
        return [teacher_model]
    teachers = list(teacher_model)
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise TypeError("`teacher_model` is a model or a non-empty list of models.")
    return teachers


def _autograd_safe(tensors):
    return None if tensors is None else tuple(t.clone() for t in tensors)


def _accepted_inputs(model: nn.Module):
    params = inspect.signature(model.forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return lambda key: key not in NOT_MODEL_INPUTS
    return lambda key: key in params and key not in NOT_MODEL_INPUTS


def _batch_size(inputs: Mapping[str, Any]) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


def _unique_keys(distillers: Sequence[Distiller]) -> list[str]:
    """Registry names, numbered when a name repeats (``kl``, ``kl_2``); used in logs as ``loss/<key>``."""
    keys, seen = [], {}
    for distiller in distillers:
        name = distiller.name or type(distiller).__name__
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return keys


def _union(requirements) -> Requirements:
    result = Requirements(teacher=False)
    for requirement in requirements:
        result = result | requirement
    return result

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
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ModelOutput

from .arguments import DEFAULT_DISTILLERS, DistillationArguments
from .callbacks import ScheduleCallback
from .architecture import accepted_inputs, learned_positions, output_head, task_of, unwrap
from .capture import ModelView, Requirements, capture_features, capture_head_input
from .distillers.base import (
    Distiller,
    build_distiller,
    ordered_union,
    teacher_of,
    trains_teacher,
    weighted_losses,
)
from .checkpoints import (
    DISTILLER_STATE_NAME,
    TEACHER_STATE_NAME,
    check_resumable,
    describe,
    last_complete_checkpoint,
    save_distillation_state,
)
from .ledger import LossLedger
from .normalization import StepBatch, StepCounts, batch_size, denominator, share, step_counts
from .progressive import ProgressiveLayerCallback
from .row_loss import RowTerm, row_losses, rows_from_views
from .teachers import prepare_teacher, shared_logit_width

logger = logging.getLogger(__name__)

OBJECTIVE = "distillation_loss"  # the optimised objective in evaluation: metric `<prefix>_distillation_loss`



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
        if not specs:  # the 6-line edit of a Trainer script: standard Hinton KD
            specs = [dict(spec) for spec in DEFAULT_DISTILLERS]
            logger.warning("No distillers given: using %s (Hinton KD). Choose others with `distillers=[...]` or "
                           "--distillers '[{\"name\": ...}]'; hf_kd.list_distillers() lists the names.", specs)
        self._distiller_specs = list(specs)
        self.distillers = nn.ModuleList(build_distiller(spec) for spec in specs)
        self.distiller_keys = _unique_keys(self.distillers)
        self.requirements = _union(d.requires for d in self.distillers)
        teachers = _teacher_list(teacher_model)
        if model is not None and any(t is model for t in teachers):
            raise ValueError(
                "The student (`model`) and a teacher (`teacher_model`) are the same object. The teacher is frozen in "
                "place, so the student would not train. Pass a separate teacher: load it again with from_pretrained, "
                "or copy.deepcopy(student) before distilling."
            )
        self._check_teacher_indices(len(teachers))
        if args.hard_label_weight == 0 and all(d.weight == 0 and "weight" not in d.schedules for d in self.distillers):
            logger.warning("hard_label_weight is 0 and every distiller's weight is 0: the loss is 0 and the student "
                           "gets no gradient. Give hard_label_weight or some distiller a positive weight.")
        callbacks = [*(kwargs.pop("callbacks", None) or []), ScheduleCallback(self.distillers), _StepEvents(self)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

        student = unwrap(self.model)
        self.teachers = [prepare_teacher(t, self.accelerator, args.teacher_torch_dtype) for t in teachers]
        self.teacher = self.teachers[0] if self.teachers else None  # the first (or only) teacher
        bare_teachers = [unwrap(t) for t in self.teachers]
        readers = [self._readers(index) for index in range(len(teachers))]
        self._check_outputs_available(student, bare_teachers)
        self._check_same_inputs(student, bare_teachers)
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
        self._student_inputs = accepted_inputs(student)
        self._position_limits = [(role, limit) for role, model in
                                 [("student", student)] + [(f"teacher {i}" if len(bare_teachers) > 1 else "teacher", t)
                                                           for i, t in enumerate(bare_teachers)]
                                 if (limit := learned_positions(model)) is not None]
        self._teacher_inputs = [accepted_inputs(t) for t in bare_teachers]
        self.ledger = LossLedger()
        self._step_counts: StepCounts | None = None
        self._checkpoint_folder: str | None = None
        self._fused_checked = False
        self._skip_this_step = False
        self._skipped_steps = 0
        self._scales_checked = False
        self._teacher_metrics: dict[str, dict[str, float]] = {}
        self._student_only = False  # predict(): the student alone
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

    def _check_same_inputs(self, student: nn.Module, teachers: list[nn.Module]) -> None:
        """Student and teachers must read the same kind of input (token ids, pixels, ...)."""
        wanted = getattr(student, "main_input_name", None)
        for index, teacher in enumerate(teachers):
            theirs = getattr(teacher, "main_input_name", None)
            if wanted and theirs and theirs != wanted:
                role = "the teacher" if len(teachers) == 1 else f"teacher {index}"
                raise ValueError(
                    f"The student ({type(student).__name__}) reads `{wanted}` but {role} ({type(teacher).__name__}) "
                    f"reads `{theirs}`: distillation needs both on the same inputs. Use a teacher of the student's "
                    f"modality."
                )

    def _check_lengths(self, inputs: Mapping[str, Any]) -> None:
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2:
            return
        for role, limit in self._position_limits:
            if ids.shape[-1] > limit:
                raise ValueError(
                    f"A batch of {ids.shape[-1]} tokens is longer than the {role}'s max_position_embeddings={limit} "
                    f"(learned positions). Truncate the inputs, e.g. tokenizer(..., truncation=True, "
                    f"max_length={limit})."
                )

    def _check_batch(self, inputs: Mapping[str, Any]) -> None:
        self._check_lengths(inputs)
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
    # compute_loss normalises over the optimizer step's global batch itself (hf_kd.normalization), so Trainer must
    # not divide by the accumulation steps, whatever the model's loss kwargs.
    loss_is_scaled_for_ga = True

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns any teacher takes too (``remove_unused_columns`` would otherwise drop e.g. a BERT
        teacher's ``token_type_ids`` because a DistilBERT student does not take them); each model then gets only
        what its ``forward`` accepts."""
        super()._set_signature_columns_if_needed()
        teacher_columns = [name for t in self.teachers for name in inspect.signature(unwrap(t).forward).parameters]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *teacher_columns]))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one optimizer step's micro-batches, plus their :class:`StepCounts` (summed over
        processes when ``average_tokens_across_devices``, as Trainer does for its token count)."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        reduce = (lambda totals: self.accelerator.reduce(totals, reduction="sum")) if self._global_counts else None
        self._step_counts = step_counts(batches, self._student_task, device, reduce) if batches else None
        return batches, num_items_in_batch

    @property
    def _global_counts(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.accelerator.num_processes > 1

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
        batch = StepBatch(inputs, self._step_counts if training else None)
        # Every term below is a mean over this micro-batch; weighting it by the micro-batch's share of the global
        # batch (times the processes, whose gradients DDP averages) makes the step's loss the global batch's loss.
        scale = share(batch) * (self.accelerator.num_processes if batch.counts is not None and self._global_counts
                                else 1)
        if self._fused_lm and training and not self._fused_checked:
            self._check_fused_path(model, batch)
        fused = self._fused_lm and training
        hard_weight = self.args.hard_label_weight
        # In evaluation the student's own loss is computed whatever its weight: it is the reported eval_loss.
        want_hard = "labels" in inputs and (hard_weight > 0 or not model.training)
        hard_as_row = want_hard and self._hard_loss_is_cross_entropy(inputs)

        student, outputs = self._student_forward(
            model, batch, fused, want_hard and not hard_as_row, num_items_in_batch, scale
        )
        # Evaluation without distiller terms (predict(), or eval_distillation_losses=False): the student alone.
        student_only = not model.training and (self._student_only or not self.args.eval_distillation_losses)
        teachers = [
            self._teacher_forward(index, batch, fused, training) if run and not student_only else None
            for index, run in enumerate(self._teachers_run)
        ]

        components: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        if student.loss is not None:  # the model's own loss, already on the step's scale
            components["hard"] = student.loss
            total = total + hard_weight * student.loss
        distill_total, values = self._distiller_losses(student, teachers, batch, hard_as_row, not student_only)
        total = total + scale * distill_total
        components.update({name: value * scale for name, value in values.items()})
        if training:
            self._check_finite(total, components, student, teachers)
        self._record(model, components, total, inputs, objective=not student_only)
        # Training optimises the total; evaluation reports what a plain Trainer would, the student's own loss (so
        # exp(eval_loss) is its perplexity and best-checkpoint selection compares students), the total beside it.
        loss = components["hard"] if not model.training and "hard" in components else total
        if return_outputs:
            return loss, DistillationOutput(loss=loss.detach(), logits=outputs.logits)
        return loss

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

    def _distiller_losses(self, student, teachers, batch, hard_as_row, with_distillers=True):
        """``sum_i w_i * L_i`` over the distillers (plus the student's cross-entropy) and each ``L_i``, as means over
        the micro-batch (see ``compute_loss``).

        Row terms share one chunked pass per teacher they read (the student's cross-entropy joins the first); a
        teacher trained by some distiller gets two passes, so that only the distillers that train it see its
        logits with autograd history.
        """
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        groups: dict[tuple[int, bool] | None, list[RowTerm]] = {}
        for key, distiller in self._row_distillers if with_distillers else ():
            group = (distiller.teacher_index, trains_teacher(distiller))
            groups.setdefault(group, []).append(RowTerm(key, distiller.row_loss, distiller.weight))
        if hard_as_row:
            groups.setdefault(next(iter(groups), None), []).insert(
                0, RowTerm("hard", self._cross_entropy, self.args.hard_label_weight)
            )
        for group, terms in groups.items():
            teacher = None
            if group is not None:
                teacher = teachers[group[0]] if group[1] else teachers[group[0]].detached()
            rows = rows_from_views(student, teacher, batch)
            group_total, group_values = row_losses(
                terms, rows.student, rows.teacher, rows.rows, rows.targets, rows.vocab_size,
                denominator(batch, "rows", rows.rows.numel()), self.args.loss_chunk_size,
            )
            total = total + group_total
            values.update(group_values)
        named = self._other_distillers if with_distillers else ()
        other_total, other_values = weighted_losses(named, student, teachers, batch)
        return total + other_total, {**values, **other_values}

    # ---- non-finite losses and the fused head path ----------------------------------------------------------
    def _check_finite(self, total, components, student, teachers) -> None:
        """Stop (``nonfinite_loss="raise"``) or mark the step for skipping when the loss is not finite, naming the
        components and the likely cause. One check of a value that is reduced anyway (Trainer checks it too)."""
        if bool(torch.isfinite(total.detach())):
            return
        bad = [name for name, value in components.items() if not bool(torch.isfinite(value.detach()).all())]
        message = (
            f"The distillation loss is not finite at step {self.state.global_step}: component(s) "
            f"{', '.join(bad) or 'none alone, their weighted sum'}. {_nonfinite_cause(self, student, teachers)}"
        )
        if self.args.nonfinite_loss == "raise":
            raise FloatingPointError(message + " Set nonfinite_loss='skip_step' to skip such steps instead.")
        if not self._skip_this_step:
            logger.warning("%s Skipping this optimizer step (nonfinite_loss='skip_step').", message)
        self._skip_this_step = True

    def _check_fused_path(self, model, batch) -> None:
        """Once, on the first training batch: keep the fused head path only if every model's logits are exactly its
        output head applied to the head's input (a ``forward()`` that masks or scales logits afterwards is caught
        here), else fall back to the plain logits path for the run."""
        self._fused_checked = True
        sample = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
        models = [("student", unwrap(model), {k: v for k, v in sample.items() if self._student_inputs(k)})] + [
            (f"teacher {i}" if len(self.teachers) > 1 else "teacher", unwrap(teacher),
             {k: v for k, v in sample.items() if self._teacher_inputs[i](k)})
            for i, teacher in enumerate(self.teachers) if self._teachers_run[i]
        ]
        for role, bare, kwargs in models:
            head = output_head(bare)
            with torch.no_grad(), capture_head_input(head, skip_logits=False) as captured:
                logits = bare(**kwargs).logits
            fused = F.linear(captured["input"], head.weight, head.bias)
            if not torch.allclose(fused.float(), logits.float(), rtol=1e-3, atol=1e-3, equal_nan=True):
                self._fused_lm = False
                logger.warning(
                    "The %s (%s) returns logits that are not its output head applied to the head's input (its "
                    "forward() masks, scales or caps them); token-level losses use the plain logits path for this "
                    "run (fused_lm_loss has no effect).", role, type(bare).__name__,
                )
                return
        logger.info("Token-level losses use the fused head path (logits formed chunk by chunk).")

    # ---- forward passes --------------------------------------------------------------------------------------
    def _output_flags(self) -> dict[str, bool]:
        flags = {}
        if self.requirements.hidden_states:
            flags["output_hidden_states"] = True
        if self.requirements.attentions:
            flags["output_attentions"] = True
        return flags

    def _student_forward(self, model, inputs, fused, model_loss, num_items_in_batch, scale):
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
            student_inputs = {k: v for k, v in inputs.items() if self._student_inputs(k)}
            if model_loss and self.compute_loss_func is not None:  # normalised over the step by contract
                hard, outputs = super().compute_loss(
                    model, {**student_inputs, "labels": inputs["labels"], **flags}, return_outputs=True,
                    num_items_in_batch=num_items_in_batch,
                )
            elif model_loss:  # the model's own loss (regression, multi-label, ...): a mean over the micro-batch
                hard, outputs = super().compute_loss(model, {**student_inputs, "labels": inputs["labels"], **flags},
                                                     return_outputs=True)
                hard = hard * scale
            else:
                outputs = model(**student_inputs, **flags)
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
    def _record(self, model, components, total, inputs, objective: bool = True) -> None:
        named = {f"loss/{name}": value for name, value in components.items()}
        if model.training and torch.is_grad_enabled():
            self.ledger.add_train({"loss": total, **named}, self.state.global_step)
        elif not model.training:
            self.ledger.add_eval({**components, **({OBJECTIVE: total} if objective else {})}, batch_size(inputs))

    def _gather(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(value.reshape(1))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the components averaged over the same window as `loss`
            window = self.ledger.pop_window(self.state.global_step, self._gather)
            logs.update({k: v for k, v in window.items() if k != "loss"})
            if not self._scales_checked and window:
                self._scales_checked = True
                self._warn_on_dominant_term(window)
            if self._skipped_steps:
                logs["skipped_steps"] = self._skipped_steps
        super().log(logs, start_time)

    def _warn_on_dominant_term(self, window: dict[str, float]) -> None:
        """Once, at the first training log: warn when one weighted term is over 100x another (e.g. hidden-state MSE
        on an LLM's residual stream, ~1e4, beside a KL of ~1), which silently swamps the others."""
        weights = {"hard": self.args.hard_label_weight, **{k: d.weight for k, d in zip(self.distiller_keys,
                                                                                      self.distillers)}}
        terms = {name: abs(window[f"loss/{name}"]) * weight for name, weight in weights.items()
                 if f"loss/{name}" in window and weight > 0}
        positive = {name: value for name, value in terms.items() if value > 0}
        if len(positive) < 2:
            return
        big, small = max(positive, key=positive.get), min(positive, key=positive.get)
        if positive[big] > 100 * positive[small]:
            logger.warning(
                "The weighted term %r (%.3g) is %.0fx the term %r (%.3g): it dominates the loss. Lower its weight, or "
                "use a scale-free loss (e.g. hidden_states with loss='cosine').", big, positive[big],
                positive[big] / positive[small], small, positive[small],
            )

    def _end_step(self, args, state, control) -> None:
        """Close the optimizer step in the ledger (a skipped step's values are dropped) and send
        ``on_distillation_step`` to the callbacks that define it."""
        step = self.ledger.close_step(keep=not self._skip_this_step)
        self._skip_this_step = False
        listeners = [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_distillation_step")]
        if not listeners:
            return
        losses = {name: value.item() for name, value in step.items()}
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
            key = f"{metric_key_prefix}_{name}" if name == OBJECTIVE else f"{metric_key_prefix}_loss/{name}"
            output.metrics[key] = value
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.args.teacher_eval_metrics:  # measured once per evaluation set, merged into every result
            if metric_key_prefix not in self._teacher_metrics:
                teacher_metrics = {}
                for index in range(len(self.teachers)):  # eval_teacher_* (one teacher) or eval_teacher<i>_*
                    prefix = f"{metric_key_prefix}_teacher" + (str(index) if len(self.teachers) > 1 else "")
                    teacher_metrics.update(self.evaluate_teacher(eval_dataset, ignore_keys, prefix, index))
                self._teacher_metrics[metric_key_prefix] = teacher_metrics
            metrics.update(self._teacher_metrics[metric_key_prefix])
        return metrics

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """``Trainer.predict`` of the student alone: no teacher pass, no distiller terms."""
        self._student_only = True
        try:
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._student_only = False

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

    def _needed_state_files(self) -> list[str]:
        """The distillation state files a checkpoint of this run must hold to be resumed."""
        needed = [DISTILLER_STATE_NAME] if self.distillers.state_dict() else []
        return needed + ([TEACHER_STATE_NAME] if self._teacher_trained else [])

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:  # Trainer would take the newest folder, even one whose save was cut off
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, self._needed_state_files())
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint found in output_dir ({self.args.output_dir}).")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        super()._save(output_dir, state_dict)
        if not self.args.should_save:  # Trainer may call _save on every process; files come from the main one
            return
        if output_dir == self._checkpoint_folder:  # before trainer_state.json and the rotation of old checkpoints
            states = {DISTILLER_STATE_NAME: self.distillers.state_dict(),
                      TEACHER_STATE_NAME: self._trained_teacher_state() if self._teacher_trained else {}}
            manifest = {"distillers": describe(self.distiller_keys, self.distillers, self._distiller_specs)}
            save_distillation_state(output_dir, manifest, states)
        for distiller in self.distillers:
            distiller.on_save(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        self._checkpoint_folder = os.path.join(self._get_output_dir(trial),
                                               f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpoint_folder = None

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        # Runs on every resume, whatever the backend, so online state is restored next to the optimizer's. It is
        # checked and loaded first, so that other distillers or options are named before torch's optimizer errors.
        if checkpoint:
            check_resumable(checkpoint, self._needed_state_files(), describe(self.distiller_keys, self.distillers))
            self._load_distillation_state(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_distillation_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, DISTILLER_STATE_NAME)
        if os.path.isfile(path):
            saved = torch.load(path, map_location=self.args.device, weights_only=True)
            try:
                self.distillers.load_state_dict(saved)
            except RuntimeError as error:
                raise ValueError(
                    f"{path} does not fit the distillers' current options (their state changed shape or names): "
                    f"{error}. Resume with the options the checkpoint was trained with."
                ) from None
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
        trainer, accelerator = self.trainer, self.trainer.accelerator
        if accelerator.num_processes > 1:
            for param in trainer.online_parameters():
                if param.grad is not None:
                    param.grad = accelerator.reduce(param.grad, reduction="mean")
        if args.nonfinite_loss == "skip_step":
            skip = torch.tensor(float(trainer._skip_this_step), device=args.device)
            if accelerator.num_processes > 1:  # every process skips the same steps
                skip = accelerator.reduce(skip, reduction="sum")
            trainer._skip_this_step = bool(skip > 0)
            if trainer._skip_this_step:  # no gradient, no update (optimizers leave parameters without .grad alone)
                trainer._skipped_steps += 1
                for group in trainer.optimizer.param_groups:
                    for param in group["params"]:
                        param.grad = None

    def on_optimizer_step(self, args, state, control, **kwargs):
        for param in self.trainer.online_parameters():
            param.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._end_step(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer._step_counts = None  # compute_loss outside training normalises each batch on its own


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


def _nonfinite_cause(trainer: DistillationTrainer, student: ModelView, teachers) -> str:
    """The likely cause of a non-finite loss (knobs are finite: they are checked when given), read off the outputs of
    the step that produced it."""
    for index, view in enumerate(teachers):
        out = None if view is None else (view.logits if view.logits is not None else view.head_input)
        if out is None:
            continue
        role = "teacher" if len(teachers) == 1 else f"teacher {index}"
        if bool(torch.isnan(out).any() | torch.isposinf(out).any()):
            hint = " fp16 overflow? Use teacher_dtype='bfloat16' (or float32)." if out.dtype == torch.float16 else ""
            return f"The {role}'s outputs are not finite (NaN or +inf in {out.dtype}).{hint}"
        if bool(torch.isneginf(out).any()):
            return (
                f"The {role}'s logits are -inf at some entries (a masked vocabulary), where reverse KL and logit MSE "
                f"are infinite by definition; use kl, jsd, tvd, skew_kl or skew_reverse_kl there, which take "
                f"0 * log 0 = 0."
            )
        if next(view.model.parameters()).dtype == torch.float16:
            return (f"The {role} runs in float16, whose logits overflow above 65504: fp16 overflow? Use "
                    f"teacher_dtype='bfloat16' (or float32).")
    out = student.logits if student.logits is not None else student.head_input
    if out is not None and not bool(torch.isfinite(out).all()):
        return ("The student's outputs are not finite: training diverged (lower learning_rate, set max_grad_norm) or "
                "its dtype overflows.")
    return "Check the learning rate and this batch's inputs."


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

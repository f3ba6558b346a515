"""``DistillationTrainer``: ``transformers.Trainer`` with a teacher and a list of distillers.

One training step (see ``docs/design.md``)::

    loss = hard_label_weight * student_loss + sum_i weight_i(step) * distiller_i(student_view, teacher_view, batch)

The trainer knows no method by name. It asks the distillers what they read (``requires``) and captures only that;
distillers with a per-row loss on logits (``row_loss``) share one chunked pass over samples/tokens
(:mod:`hf_kd.row_loss`); the others are called with the two :class:`~hf_kd.capture.ModelView`s.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ModelOutput

from .agreement import agreement_metrics, agreement_per_sample
from .architecture import SAMPLE_INDEX, accepted_inputs, output_head, task_of, unwrap
from .arguments import DEFAULT_DISTILLERS, DistillationArguments
from .cache_slot import CacheSlot, check_cache, open_cache, refuse_uncached, stand_in_teacher
from .callbacks import StepCallback
from .capture import ModelView, Requirements, capture_features, capture_head_input
from .checkpoints import (
    DISTILLER_STATE_NAME,
    TEACHER_STATE_NAME,
    check_resumable,
    describe,
    last_complete_checkpoint,
    load_distillation_state,
    needed_state_files,
    save_distillation_state,
)
from .checks import (
    check_batch,
    check_fused_path,
    check_logit_widths,
    check_outputs_available,
    check_same_inputs,
    check_teacher_indices,
    position_limits,
    warn_on_dominant_term,
)
from .distillers.base import (
    Distiller,
    build_distiller,
    distiller_keys,
    ordered_union,
    teacher_of,
    trains_teacher,
    weighted_losses,
)
from .ledger import LossLedger
from .nonfinite import NonFiniteSteps
from .normalization import StepBatch, StepCounts, batch_size, denominator, share, step_counts
from .on_policy import completion_source
from .progressive import ProgressiveLayerCallback
from .prompts import PROMPT_KEYS, PROMPT_LENGTH
from .row_loss import RowTerm, row_losses, rows_from_views
from .sample_index import with_sample_index
from .sharding import check_shardable, place_teachers, release, teacher_engine
from .teachers import TeacherSlot, prepare_teacher, readers_of, teacher_list, teacher_role

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
        teacher_cache: Instead of ``teacher_model``: the folder (or dataset) ``hf_kd.cache.cache_teacher_outputs``
            wrote over ``train_dataset``; the teacher never runs (``args.teacher_cache`` gives it too).
        **kwargs: Every other ``Trainer`` argument (``train_dataset``, ``eval_dataset``, ``processing_class``,
            ``data_collator``, ``compute_metrics``, ``callbacks``, ``optimizers``, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        teacher_model: nn.Module | Sequence[nn.Module] | None = None,
        args: DistillationArguments | None = None,
        distillers: Sequence[Distiller | Mapping[str, Any]] | None = None,
        teacher_cache: str | Any | None = None,
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
        self.distiller_keys = distiller_keys(self.distillers)
        self._named = list(zip(self.distiller_keys, self.distillers))
        self.requirements = functools.reduce(operator.or_, (d.requires for d in self.distillers),
                                             Requirements(teacher=False))
        teachers = teacher_list(teacher_model)
        teacher_cache = teacher_cache if teacher_cache is not None else args.teacher_cache
        if teacher_cache is not None and teachers:
            raise ValueError("Give `teacher_model` or `teacher_cache`, not both: a cached run never runs the teacher.")
        cache = open_cache(teacher_cache) if teacher_cache is not None else None
        if cache is not None:
            refuse_uncached(self._named, cache[1])
            if args.teacher_eval_metrics:
                raise ValueError("teacher_eval_metrics=True evaluates the teacher model, and a `teacher_cache` run has "
                                 "none; set teacher_eval_metrics=False (or train with teacher_model=...).")
        if model is not None and any(t is model for t in teachers):
            raise ValueError(
                "The student (`model`) and a teacher (`teacher_model`) are the same object. The teacher is frozen in "
                "place, so the student would not train. Pass a separate teacher: load it again with from_pretrained, "
                "or copy.deepcopy(student) before distilling."
            )
        check_teacher_indices(self._named, len(teachers) or int(cache is not None))
        if args.hard_label_weight == 0 and all(d.weight == 0 and "weight" not in d.schedules for d in self.distillers):
            logger.warning("hard_label_weight is 0 and every distiller's weight is 0: the loss is 0 and the student "
                           "gets no gradient. Give hard_label_weight or some distiller a positive weight.")
        self._index_readers = [key for key, d in self._named if d.needs_sample_index]
        self._index_readers += ["teacher_cache"] if cache is not None else []
        if self._index_readers:
            kwargs["train_dataset"] = with_sample_index(kwargs.get("train_dataset"), self._index_readers)
            for distiller in self.distillers:
                if distiller.needs_sample_index:
                    distiller.dataset_size = len(kwargs["train_dataset"])
        callbacks = [*(kwargs.pop("callbacks", None) or []), StepCallback(self)]
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)

        student = unwrap(self.model)
        engine = teacher_engine(args.teacher_sharding, self.accelerator)  # a sharded teacher never comes whole
        self.teachers = [prepare_teacher(t, self.accelerator, args.teacher_torch_dtype, args.teacher_device,
                                         place=engine == "none") for t in teachers]  # to the device
        # A cache's teacher is a weightless stand-in built from its config: the checks and setup read its shape.
        stand_in = None
        if cache is not None:
            check_cache(cache[1], cache[0], self.train_dataset, student, self.processing_class)
            stand_in = stand_in_teacher(cache[1])
        bare_teachers = [unwrap(t) for t in self.teachers] or ([stand_in] if stand_in is not None else [])
        roles = [("student", student)] + [(teacher_role(i, len(bare_teachers)), t) for i, t in enumerate(bare_teachers)]
        readers = [readers_of(self.distillers, index) for index in range(len(bare_teachers))]
        check_outputs_available(self.requirements, roles)
        check_same_inputs(student, roles[1:])
        check_logit_widths(student, bare_teachers, readers, self.processing_class)
        for distiller in self.distillers:
            distiller.setup(student, teacher_of(distiller, bare_teachers))
        self.distillers.to(args.device)
        self._student_features = ordered_union(d.student_features() for d in self.distillers)
        if args.progressive_layers:
            self.add_callback(ProgressiveLayerCallback(self.distillers, self.distiller_keys, **args.progressive_layers))

        # (key, distiller, row pass): the teacher index, None for every teacher, and whether it trains it; None
        # for the pass of the row terms that read no teacher
        self._row_distillers = [
            (k, d, (None if d.multi_teacher else d.teacher_index, trains_teacher(d)) if d.requires.teacher else None)
            for k, d in self._named if hasattr(d, "row_loss")]
        self._other_distillers = [(k, d) for k, d in self._named if not hasattr(d, "row_loss")]
        self._teacher_params = list(ordered_union(d.teacher_parameters() for d in self.distillers))
        for param in self._teacher_params:
            param.requires_grad_(True)
        self._teacher_trained = bool(self._teacher_params)
        check_shardable(engine, self._teacher_params)
        self.teachers = place_teachers(self.teachers, engine, self.accelerator, args.teacher_shard_modules)
        self.teacher = self.teachers[0] if self.teachers else None  # the first (or only) teacher
        self._cached = cache is not None
        if cache is not None:
            rows, metadata = cache
            self._slots = [CacheSlot.build(rows, metadata, readers_of(self.distillers, 0), args.device, stand_in)]
        else:
            self._slots = [TeacherSlot.build(t, i, len(teachers), readers[i], self._teacher_params, args.device,
                                             args.teacher_device, fused_head=engine != "deepspeed")
                           for i, t in enumerate(self.teachers)]
        self._student_task = task_of(student)
        self._fused_lm = (
            args.fused_lm_loss
            and bool(self._slots or self._row_distillers)  # a teacher, or row terms that read none
            and self._student_task == "causal_lm"
            and output_head(student) is not None
            and all(slot.head is not None or slot.cached for slot in self._slots)  # a cache gives logits
            and not self._teacher_trained
            and not any(d.requires.logits for _, d in self._other_distillers)
        )
        self._student_inputs = accepted_inputs(student)
        self._completions = completion_source(args, student, self._student_task, self.teachers, self._cached,
                                              engine != "none", self.processing_class, self.train_dataset)
        self._position_limits = position_limits(roles)
        wanted = {"output_hidden_states": self.requirements.hidden_states,
                  "output_attentions": self.requirements.attentions}
        self._flags = {flag: True for flag, on in wanted.items() if on}  # what every forward pass is asked for
        self.ledger = LossLedger()
        self._nonfinite = NonFiniteSteps(args.nonfinite_loss)
        self._step_counts: StepCounts | None = None
        self._checkpoint_folder: str | None = None
        self._fused_checked = False
        self._scales_checked = False
        self._teacher_metrics: dict[str, dict[str, float]] = {}
        self._student_only = False  # predict(): the student alone
        self._evaluating_teacher = False
        self._agreement: torch.Tensor | None = None  # evaluation: summed (agree, kl, rows), hf_kd.agreement

    # ---- the loss --------------------------------------------------------------------------------------------
    # compute_loss normalises over the optimizer step's global batch itself (hf_kd.normalization), so Trainer must
    # not divide by the accumulation steps, whatever the model's loss kwargs.
    loss_is_scaled_for_ga = True

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns any teacher takes too (``remove_unused_columns`` would otherwise drop e.g. a BERT
        teacher's ``token_type_ids`` because a DistilBERT student does not take them); each model then gets only
        what its ``forward`` accepts; and the sample index when a distiller reads it (:mod:`hf_kd.sample_index`)."""
        super()._set_signature_columns_if_needed()
        teacher_columns = [name for t in self.teachers for name in inspect.signature(unwrap(t).forward).parameters]
        index = [SAMPLE_INDEX] if self._index_readers else []
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *teacher_columns, *index,
                                                      PROMPT_LENGTH]))  # prompt data: where completions start

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Trainer's prefetch of one optimizer step's micro-batches, plus their :class:`StepCounts` (summed over
        processes when ``average_tokens_across_devices``, as Trainer does for its token count)."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._completions is not None and batches:  # on-policy / seq_kd: the step's completions generated first
            if PROMPT_KEYS[0] not in batches[0]:
                raise ValueError("lmbda / seq_kd generate completions for the batch's prompts, and this batch has no "
                                 "`prompt_input_ids`. Tokenize the data with hf_kd.tokenize_prompts and pass "
                                 "data_collator=hf_kd.PromptCompletionCollator(tokenizer.pad_token_id).")
            generated = self._completions.complete(batches, self.state.global_step, unwrap(self.model),
                                                   unwrap(self.teachers[0]) if self.teachers else None)
            if generated is not batches:
                batches, num_items_in_batch = generated, self._get_num_items_in_batch(generated, device)
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
        if self._evaluating_teacher:  # the teacher's own loss, per batch as one process computes it: Trainer would
            # multiply it by the number of processes when given num_items_in_batch, which a classifier's loss ignores
            return super().compute_loss(model, inputs, return_outputs, None)
        check_batch(inputs, self._position_limits, self.args.hard_label_weight, self._named)
        training = model.training and torch.is_grad_enabled()
        batch = StepBatch(inputs, self._step_counts if training else None)
        # Every term below is a mean over this micro-batch; weighting it by the micro-batch's share of the global
        # batch (times the processes, whose gradients DDP averages) makes the step's loss the global batch's loss.
        scale = share(batch) * (self.accelerator.num_processes if batch.counts is not None and self._global_counts
                                else 1)
        if self._fused_lm and training and not self._fused_checked:  # once, on the first training batch
            self._fused_checked = True
            self._fused_lm = check_fused_path(
                [("student", unwrap(model), self._student_inputs),
                 *((slot.role, slot.bare, slot.accepts) for slot in self._slots if slot.runs and slot.bare)], batch)
        fused = self._fused_lm and training
        hard_weight = self.args.hard_label_weight
        # In evaluation the student's own loss is computed whatever its weight: it is the reported eval_loss.
        want_hard = "labels" in inputs and (hard_weight > 0 or not model.training)
        hard_as_row = want_hard and self._hard_loss_is_cross_entropy(inputs)

        student, outputs = self._student_forward(
            model, batch, fused, want_hard and not hard_as_row, num_items_in_batch, scale
        )
        # Evaluation without distiller terms (predict(), or eval_distillation_losses=False): the student alone.
        # A cache covers the train rows: evaluation with it runs the student alone too.
        student_only = not model.training and (self._student_only or not self.args.eval_distillation_losses
                                                or self._cached)
        read = set() if student_only else {
            slot.index for slot in self._slots if slot.runs
            and any(slot.index in d.teachers_read(len(self._slots), model.training) for d in slot.readers)}
        teachers = [slot.forward(batch, self._flags, fused, training) if slot.index in read else None
                    for slot in self._slots]

        components: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        if student.loss is not None:  # the model's own loss, already on the step's scale
            components["hard"] = student.loss
            total = total + hard_weight * student.loss
        distill_total, values = self._distiller_losses(student, teachers, batch, hard_as_row, not student_only)
        for slot in self._slots:  # a sharded teacher's gathered root, kept for the fused head path, is freed
            release(slot.model)
        total = total + scale * distill_total
        if not model.training and self.args.eval_teacher_agreement and teachers and teachers[0] is not None:
            # the first teacher's view, already computed for the losses; per sample, gathered over processes with
            # the last batch's padding repeats dropped (as Trainer gathers predictions), then summed
            samples = agreement_per_sample(student, teachers[0], batch, self.args.loss_chunk_size)
            sums = self.accelerator.gather_for_metrics(samples).sum(0)
            self._agreement = sums if self._agreement is None else self._agreement + sums
        components.update({name: value * scale for name, value in values.items()})
        if training:
            self._nonfinite.check(total, components, student, self._slots, teachers, self.state.global_step)
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

        Row terms share one chunked pass per teacher they read, and one if some read none (the student's
        cross-entropy joins the first); a teacher trained by some distiller gets two passes, so that only the
        distillers that train it see its logits with autograd history.
        """
        values: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.args.device)
        groups: dict[tuple[int | None, bool] | None, list[RowTerm]] = {}  # (teacher index, None: all; trained)
        for key, distiller, group in self._row_distillers if with_distillers else ():
            groups.setdefault(group, []).append(
                RowTerm(key, distiller.row_loss, distiller.weight, tuple(distiller.parameters()),
                        distiller.reads_sparse_teacher))
        if hard_as_row:
            groups.setdefault(next(iter(groups), None), []).insert(
                0, RowTerm("hard", self._cross_entropy, self.args.hard_label_weight, sparse_teacher=True)
            )
        for group, terms in groups.items():
            teacher = None
            if group is not None:
                read = teachers if group[0] is None else [teachers[group[0]]]
                read = [view if group[1] else view.detached() for view in read]
                teacher = read if group[0] is None else read[0]
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

    # ---- forward passes --------------------------------------------------------------------------------------
    def _student_forward(self, model, inputs, fused, model_loss, num_items_in_batch, scale):
        bare = unwrap(model)
        flags = self._flags
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
        view = ModelView.from_outputs(bare, self._student_task, outputs, captured.get("input"), head,
                                      features=features, loss=hard)
        return view, outputs

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
                warn_on_dominant_term(window, {"hard": self.args.hard_label_weight,
                                               **{key: d.weight for key, d in self._named}})
            if self._nonfinite.skipped_steps:
                logs["skipped_steps"] = self._nonfinite.skipped_steps
            if self._completions is not None:  # each process's own generations, averaged over processes
                logs.update({k: self._gather(torch.tensor(v, device=self.args.device)).mean().item()
                             for k, v in self._completions.pop_logs().items()})
        super().log(logs, start_time)

    def _end_step(self, args, state, control) -> None:
        """Close the optimizer step in the ledger (a skipped step's values are dropped) and send
        ``on_distillation_step`` to the callbacks that define it."""
        step = self.ledger.close_step(keep=self._nonfinite.close_step())
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
        self._agreement = None
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._agreement is not None:  # row-weighted over the whole set (every process holds the same sums)
            output.metrics.update(agreement_metrics(self._agreement, metric_key_prefix))
            self._agreement = None
        for name, value in self.ledger.pop_eval(self._gather).items():
            key = f"{metric_key_prefix}_{name}" if name == OBJECTIVE else f"{metric_key_prefix}_loss/{name}"
            output.metrics[key] = value
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.args.teacher_eval_metrics:  # measured once per evaluation set, merged into every result
            if metric_key_prefix not in self._teacher_metrics:
                teacher_metrics = {}
                for slot in self._slots:  # eval_teacher_* (one teacher) or eval_teacher<i>_*
                    prefix = f"{metric_key_prefix}_teacher" + (str(slot.index) if len(self._slots) > 1 else "")
                    teacher_metrics.update(self.evaluate_teacher(eval_dataset, ignore_keys, prefix, slot.index))
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
            release(self.teachers[teacher_index])
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
        for slot in self._slots if trained else ():  # none trained (a cache's slot has no model)
            prefix = f"{slot.index}." if len(self._slots) > 1 else ""
            state.update({prefix + n: p.detach() for n, p in slot.bare.named_parameters() if id(p) in trained})
        return state

    def _needed_state_files(self) -> list[str]:
        return needed_state_files(self.distillers, self._teacher_trained)

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
        if output_dir != self._checkpoint_folder:  # save_model(): the student is published with its card
            self.create_model_card(output_dir=output_dir)

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
            trained = self._trained_teacher_state() if self._teacher_trained else {}
            load_distillation_state(checkpoint, self.distillers, trained, self.args.device)
        super()._load_optimizer_and_scheduler(checkpoint)

    # ---- publishing --------------------------------------------------------------------------------------------
    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        output_dir: str | None = None,
    ) -> None:
        """Write the student's ``README.md`` with :func:`hf_kd.model_card.write_card` (``Trainer``'s arguments;
        ``finetuned_from`` is the ``base_model``, by default the student's starting checkpoint; ``dataset_tags`` or
        ``dataset`` the datasets; ``tasks`` and ``dataset_args`` are not used). Called by ``save_model`` on the main
        process (into the folder saved, ``output_dir``; default ``args.output_dir``) and by ``push_to_hub``."""
        if not self.is_world_process_zero():
            return
        from .model_card import trainer_card_inputs, write_card

        inputs = trainer_card_inputs(self)
        listed = lambda value: [value] if isinstance(value, str) else list(value or [])  # noqa: E731
        write_card(output_dir or self.args.output_dir, **{
            **inputs, "base_model": finetuned_from or inputs["base_model"], "tags": listed(tags),
            "datasets": listed(dataset_tags) or listed(dataset), "language": language, "license": license,
            "model_name": model_name})

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """``Trainer.push_to_hub`` that uploads the student only: its weights, config, processing class, card and
        the files distillers write for it (:func:`hf_kd.model_card.student_files`); never the distillers' or the
        teacher's state, training arguments, checkpoints or caches. ``kwargs`` go to :meth:`create_model_card`."""
        from transformers.utils import hf_api

        from .model_card import student_files

        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (self.args.hub_model_id or self.args.output_dir).rstrip("/").split("/")[-1]
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        model_tags = getattr(self.model, "model_tags", None)
        if model_tags:
            tags = kwargs.get("tags") or []
            tags = [tags] if isinstance(tags, str) else list(tags)
            kwargs["tags"] = tags + [t for t in model_tags if t not in tags]
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        files = student_files(self.args.output_dir, self.processing_class, self.distillers)
        return hf_api().upload_folder(
            repo_id=self.hub_model_id, folder_path=self.args.output_dir, commit_message=commit_message, token=token,
            run_as_future=not blocking, allow_patterns=files, ignore_patterns=[f"{PREFIX_CHECKPOINT_DIR}-*"],
            revision=revision if revision is not None else self.args.hub_revision)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer``'s push while training (``push_to_hub=True``): the student of ``checkpoint_folder`` (its files,
        copied to ``output_dir`` as Trainer does, with the card) and nothing else; the checkpoint folders hold the
        distillers' and the teacher's state, so ``hub_strategy`` checkpoint / all_checkpoints push no checkpoint."""
        import shutil

        from transformers.trainer_utils import HubStrategy
        from transformers.utils import PushInProgress, hf_api
        from transformers.utils import logging as hf_logging

        from .model_card import CARD_NAME, student_files

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            hf_logging.get_logger(__name__).warning_once(
                f"hub_strategy={self.args.hub_strategy.value}: hf_kd pushes the student only, not the checkpoint "
                "folders (they hold distiller and teacher-side state).")
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        for name in student_files(checkpoint_folder, self.processing_class, self.distillers):
            if name != CARD_NAME:
                os.makedirs(os.path.dirname(os.path.join(output_dir, name)), exist_ok=True)
                shutil.copy(os.path.join(checkpoint_folder, name), os.path.join(output_dir, name))
        self.create_model_card(model_name=(self.args.hub_model_id or output_dir).rstrip("/").split("/")[-1])
        step = (f"step {self.state.global_step}" if self.args.save_strategy == "steps"
                else f"epoch {int(self.state.epoch or 0)}")
        job = hf_api().upload_folder(
            repo_id=self.hub_model_id, folder_path=output_dir, commit_message=f"Training in progress, {step}",
            token=self.args.hub_token, run_as_future=True,
            allow_patterns=student_files(output_dir, self.processing_class, self.distillers),
            ignore_patterns=[f"{PREFIX_CHECKPOINT_DIR}-*"], revision=self.args.hub_revision)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)


@dataclass
class DistillationOutput(ModelOutput):
    """What ``compute_loss(..., return_outputs=True)`` returns beside the loss: the total loss and the student's
    logits, whatever the student's own output class (hidden states and attentions are not passed to evaluation)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None

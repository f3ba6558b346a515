"""``DistillationArguments``: ``TrainingArguments`` plus the distillation knobs.

Every knob is a dataclass field, so ``HfArgumentParser``, YAML/JSON configs and the CLI read the same thing.
``distillers`` is a list of dicts ``{"name": ..., **options}``; on the command line it is a JSON string::

    --distillers '[{"name": "kl", "temperature": 2.0, "weight": 0.5}]'
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .distillers.base import build_distiller
from .progressive import ProgressiveLayers

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


DEFAULT_DISTILLERS = ({"name": "kl", "temperature": 2.0},)  # used when no distillers are given (Hinton et al.)


@dataclass
class DistillationArguments(TrainingArguments):
    """Arguments of :class:`~hf_kd.DistillationTrainer`; all ``TrainingArguments`` fields keep their meaning."""

    hard_label_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the student's own loss (e.g. cross-entropy on `labels`); 0 for pure "
                  "distillation."},
    )
    distillers: list[dict[str, Any]] | str | None = field(
        default=None,
        metadata={
            "help": "Distillers as a list of dicts {'name': ..., **options} (a JSON string on the command line), "
            "e.g. [{'name': 'kl', 'temperature': 2.0}]. See hf_kd.list_distillers() for the names. None: kl at "
            "temperature 2 (Hinton KD)."
        },
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype the teacher runs in: float32, bfloat16 or float16. None keeps the loaded dtype."},
    )
    teacher_device: str | None = field(
        default=None,
        metadata={"help": "Device the teachers run on, e.g. `cpu` to keep them off the accelerator; their inputs move "
                  "there and their outputs to the student's device (the fused causal-LM path is then off). None: the "
                  "training device."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Train from an offline teacher cache instead of a teacher: the folder "
                  "hf_kd.cache.cache_teacher_outputs wrote over the train dataset (logit distillers only)."},
    )
    teacher_sharding: str = field(
        default="none",
        metadata={"help": "`none`: every process holds each teacher whole. `fsdp2`: each teacher is sharded over all "
                  "processes with FSDP2 `fully_shard`, one unit per block (`teacher_shard_modules`), inference only; "
                  "the student keeps its engine (DDP). A student under FSDP shards the teachers this way whatever "
                  "this says; under DeepSpeed ZeRO-3 they run in DeepSpeed's ZeRO-3 engine."},
    )
    teacher_shard_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Class names of the teacher blocks sharded as one unit each with teacher_sharding=fsdp2. "
                  "None: the model's `_no_split_modules` (e.g. LlamaDecoderLayer), else its transformer layers."},
    )
    teacher_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of teacher-side parameters that online distillers train (their own param "
            "group); None uses `learning_rate`."
        },
    )
    teacher_eval_metrics: bool = field(
        default=False,
        metadata={"help": "Also evaluate the teacher once (metrics logged with the prefix `eval_teacher_`)."},
    )
    progressive_layers: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Progressive layer-wise distillation (Aguilar et al., 2020) as a dict (a JSON string on the "
            "command line), e.g. {'layer_distillers': ['attention', 'hidden_states'], 'mode': 'progressive', "
            "'steps_per_layer': 100, 'final_distillers': ['kl']}; keys are the trainer's distiller keys."
        },
    )
    fused_lm_loss: bool = field(
        default=True,
        metadata={
            "help": "For causal LMs with a linear output head, form logits chunk by chunk inside the loss during "
            "training, so neither model holds [batch, tokens, vocab] logits."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows (tokens) per chunk in token-level losses; peak loss memory is one chunk of logits. "
            "None: as many rows as fit 2**23 logits (about 170 tokens at a 49k vocabulary)."
        },
    )

    eval_distillation_losses: bool = field(
        default=True,
        metadata={
            "help": "Also compute the distiller terms in evaluation (runs the teachers): `eval_distillation_loss` "
            "and `eval_loss/<name>`. False: evaluation runs the student alone (eval_loss and metrics only). "
            "predict() always runs the student alone."
        },
    )
    eval_teacher_agreement: bool = field(
        default=True,
        metadata={
            "help": "In evaluation with the teacher run (eval_distillation_losses), also report how closely the "
            "student follows the (first) teacher, from the teacher pass the losses already make: "
            "`eval_teacher_agreement` (top-1 agreement) and `eval_kl_to_teacher` (KL(teacher || student) at "
            "temperature 1), means over all samples (classifiers) or predicted tokens (causal LMs)."
        },
    )
    nonfinite_loss: str = field(
        default="raise",
        metadata={
            "help": "What a non-finite training loss does: 'raise' stops before the optimizer step with an error "
            "naming the component and its likely cause; 'skip_step' skips that optimizer step (no update), warns, "
            "and counts it in the logged `skipped_steps`."
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={"help": "Causal LMs, on-policy distillation (GKD): the probability that an optimizer step trains on "
                  "completions the student samples for the step's prompts (prompt data: hf_kd.tokenize_prompts and "
                  "PromptCompletionCollator). 0: never (the dataset's completions); 1: every step."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Sequence-level KD: the steps that are not on-policy train on completions the (first) "
                  "teacher generates, instead of the dataset's."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Most tokens generated per completion."})
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature of generated completions (0: greedy). Separate from the loss "
                  "temperature, which is each distiller's `temperature`."},
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of generated completions (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling of generated completions (0: off)."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per generate call (bounds generation memory); None: the whole micro-batch."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.distillers, str):
            try:
                self.distillers = json.loads(self.distillers)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`distillers` must be a JSON list of dicts, e.g. '[{{\"name\": \"kl\"}}]'; got "
                    f"{self.distillers!r}."
                ) from error
        if isinstance(self.progressive_layers, str):
            try:
                self.progressive_layers = json.loads(self.progressive_layers)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"`progressive_layers` must be a JSON dict; got {self.progressive_layers!r}."
                ) from error
        if self.progressive_layers is not None:
            ProgressiveLayers.from_dict(self.progressive_layers)  # fail early on bad options
        if isinstance(self.distillers, dict):
            self.distillers = [self.distillers]
        self.distillers = list(self.distillers or [])
        for name in ("hard_label_weight", "teacher_learning_rate"):
            value = getattr(self, name)
            if value is None and name == "teacher_learning_rate":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r} ({type(value).__name__}).")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        for spec in self.distillers:  # unknown names, options and bad values are reported now, before any work
            build_distiller(spec)
        if self.hard_label_weight < 0:
            raise ValueError(f"`hard_label_weight` must be >= 0, got {self.hard_label_weight}.")
        if self.teacher_learning_rate is not None and self.teacher_learning_rate < 0:
            raise ValueError(f"`teacher_learning_rate` must be >= 0, got {self.teacher_learning_rate}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size <= 0:
            raise ValueError(f"`loss_chunk_size` must be a positive number of rows, got {self.loss_chunk_size}.")
        if self.nonfinite_loss not in ("raise", "skip_step"):
            raise ValueError(f"`nonfinite_loss` must be 'raise' or 'skip_step', got {self.nonfinite_loss!r}.")
        if self.teacher_sharding not in ("none", "fsdp2"):
            raise ValueError(f"`teacher_sharding` must be 'none' or 'fsdp2', got {self.teacher_sharding!r}.")
        if self.teacher_sharding == "fsdp2" and self.teacher_device is not None:
            raise ValueError("`teacher_device` and teacher_sharding='fsdp2' exclude each other: a sharded teacher runs "
                             "on every process's training device. Keep one of them.")
        if isinstance(self.teacher_shard_modules, str):
            self.teacher_shard_modules = [self.teacher_shard_modules]
        if self.teacher_device is not None:
            try:
                torch.device(self.teacher_device)
            except (RuntimeError, TypeError) as error:
                raise ValueError(f"`teacher_device` must name a torch device such as 'cpu' or 'cuda:1', got "
                                 f"{self.teacher_device!r}.") from error
        if isinstance(self.lmbda, bool) or not isinstance(self.lmbda, int | float) or not 0 <= self.lmbda <= 1:
            raise ValueError(f"`lmbda` is the probability of an on-policy step and must lie in [0, 1], got "
                             f"{self.lmbda!r}.")
        if self.generation_temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"Generation needs generation_temperature >= 0 (0: greedy), 0 < top_p <= 1 and "
                             f"top_k >= 0; got {self.generation_temperature}, {self.top_p}, {self.top_k}.")
        for name in ("max_new_tokens", "generation_batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in _DTYPES:
            raise ValueError(
                f"`teacher_dtype` must be one of {sorted(_DTYPES)} or None, got {self.teacher_dtype!r}."
            )

    @property
    def teacher_torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.teacher_dtype] if self.teacher_dtype else None

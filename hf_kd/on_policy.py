"""On-policy and sequence-level distillation of causal LMs: completions generated in training, then distilled.

GKD (Agarwal et al. 2024, https://huggingface.co/papers/2306.13649): with probability ``lmbda`` an optimizer step
trains on completions the *student* samples for the step's prompts (on-policy), so it learns from its own mistakes;
with ``seq_kd`` the other steps train on completions the *teacher* generates (sequence-level KD, Kim & Rush 2016);
otherwise on the dataset's completions (off-policy, today's path). The generated batch is then scored
teacher-forced by the student and the teachers and fed to the distillers like any batch (``jsd`` with ``beta``,
``reverse_kl``, ``kl``, ``skew_*``, the fused chunked loss, several teachers), with labels on the completion only.

* The coin is thrown once per optimizer step, from ``(seed, step)`` alone: a step's whole global batch is on-policy
  or not, the same on every process and under any gradient accumulation (so the normalisation over the step's
  tokens holds), and a resumed run throws the same coins.
* Each process generates for its own micro-batches, in chunks of ``generation_batch_size`` prompts, without
  autograd, on the unwrapped model in eval mode (no dropout), with the KV cache, the prompts padded on the left,
  stopping at EOS; sampling is seeded from ``(seed, step, micro-batch of the step's global batch)``
  (:class:`~hf_kd.step_random.StepRandom`), so runs and resumed runs generate the same.
* Two temperatures, two knobs: ``generation_temperature`` is the sampling temperature (0: greedy), the distiller's
  ``temperature`` the loss's. (TRL's GKD uses one ``temperature`` for sampling; its loss is computed at 1.)
* The completion keeps its first EOS and nothing after it; the batch is packed back to right padding (the prompt's
  tokens first, then the completion's), so positions are those of an unpadded sequence.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .prompts import PROMPT_KEYS, lacks_completions
from .step_random import StepRandom

STUDENT, TEACHER, DATASET = "student", "teacher", "dataset"  # who wrote a step's completions


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled (the ``DistillationArguments`` of the same names)."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    batch_size: int | None = None  # prompts per generate call; None: the whole micro-batch

    def generate_kwargs(self) -> dict[str, Any]:
        sample = self.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, do_sample=sample, use_cache=True)
        if sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@dataclass
class GenerationStats:
    """What users watch, summed since the last log: steps and their authors, generated sequences, tokens, seconds."""

    steps: int = 0
    authors: dict[str, int] = field(default_factory=lambda: {STUDENT: 0, TEACHER: 0, DATASET: 0})
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def logs(self) -> dict[str, float]:
        """The logged values (``on_policy/*``) of the window."""
        if not self.steps:
            return {}
        logs = {"on_policy/student_share": self.authors[STUDENT] / self.steps,
                "on_policy/teacher_share": self.authors[TEACHER] / self.steps,
                "on_policy/generation_seconds_per_step": self.seconds / self.steps}
        if self.sequences:
            logs["on_policy/generated_length"] = self.tokens / self.sequences
        return logs


class CompletionSource:
    """Decides who writes each step's completions and replaces the step's micro-batches with generated ones."""

    def __init__(self, lmbda: float, seq_kd: bool, settings: GenerationSettings, seed: int,
                 pad_token_id: int, eos_token_ids: Sequence[int]) -> None:
        self.lmbda, self.seq_kd, self.settings = lmbda, seq_kd, settings
        self.random = StepRandom(seed)
        self.pad_token_id, self.eos_token_ids = pad_token_id, list(eos_token_ids)
        self.stats = GenerationStats()
        self.generate_calls = {STUDENT: 0, TEACHER: 0}  # counted for tests and benchmarks

    def pop_logs(self) -> dict[str, float]:
        """The logging window's :class:`GenerationStats` values; the next window starts empty."""
        logs, self.stats = self.stats.logs(), GenerationStats()
        return logs

    def author(self, step: int) -> str:
        """Who writes optimizer step ``step``'s completions: ``(seed, step)`` alone decide."""
        if self.lmbda > 0:
            coin = torch.rand((), generator=self.random.keyed(step, 0)).item()
            if coin < self.lmbda:
                return STUDENT
        return TEACHER if self.seq_kd else DATASET

    def complete(self, batches: list[dict[str, Any]], step: int, student: nn.Module,
                 teacher: nn.Module | None) -> list[dict[str, Any]]:
        """The step's micro-batches, their completions written by :meth:`author` (unchanged for the dataset)."""
        author = self.author(step)
        self.stats.steps += 1
        self.stats.authors[author] += 1
        if author == DATASET:
            if all("labels" in batch and not (batch["labels"] != -100).any() for batch in batches):
                raise ValueError(f"Step {step} trains on the dataset's completions (lmbda={self.lmbda}, seq_kd=False), "
                                 "and its rows have no completion (prompt-only data). Set lmbda=1 or seq_kd=True, "
                                 "or give the rows a `completion`.")
            return batches
        model = student if author == STUDENT else teacher
        start = time.perf_counter()
        completed = []
        for batch in batches:
            seed = self.random.generator(step).initial_seed()  # this micro-batch's draw of the step
            completed.append(self._generated(batch, model, seed))
            self.generate_calls[author] += 1
        self.stats.seconds += time.perf_counter() - start
        return completed

    def _generated(self, batch: Mapping[str, Any], model: nn.Module, seed: int) -> dict[str, Any]:
        prompts, mask = batch[PROMPT_KEYS[0]], batch[PROMPT_KEYS[1]]
        size = self.settings.batch_size or len(prompts)
        pieces = [generate(model, prompts[i : i + size], mask[i : i + size], self.settings, self.pad_token_id,
                           self.eos_token_ids, seed + i) for i in range(0, len(prompts), size)]
        width = max(ids.shape[1] for ids, _ in pieces)
        completions = torch.cat([nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_token_id)
                                 for ids, _ in pieces])
        kept = torch.cat([nn.functional.pad(keep, (0, width - keep.shape[1])) for _, keep in pieces])
        self.stats.sequences += len(prompts)
        self.stats.tokens += int(kept.sum())
        return {**batch, **packed(prompts, mask, completions.to(prompts.device), kept.to(prompts.device),
                                  self.pad_token_id)}


def generate(model: nn.Module, prompts: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings,
             pad_token_id: int, eos_token_ids: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(completions [B, N], kept [B, N])`` sampled by ``model`` for left-padded ``prompts``: no autograd, eval mode
    (restored after), the KV cache, the global RNG seeded with ``seed`` inside a forked RNG state (the training's
    random stream is untouched). ``kept`` marks each completion's tokens up to and including its first EOS."""
    device = next(model.parameters()).device
    training = model.training
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=prompts.to(device), attention_mask=mask.to(device),
                                 pad_token_id=pad_token_id, eos_token_id=list(eos_token_ids) or None,
                                 **settings.generate_kwargs())
    finally:
        model.train(training)
    completions = out[:, prompts.shape[1]:]
    is_eos = torch.isin(completions, torch.tensor(list(eos_token_ids), device=completions.device))
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # past the first EOS
    return completions, ~after_eos


def packed(prompts: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor, kept: torch.Tensor,
           pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` / ``labels`` of prompt + completion per row, padded on the right; labels
    are the completion's tokens (``-100`` on the prompt and the padding)."""
    rows = [torch.cat([p[m.bool()], c[k]]) for p, m, c, k in zip(prompts, prompt_mask, completions, kept)]
    starts = prompt_mask.sum(-1).tolist()
    width = max(len(row) for row in rows)
    input_ids = prompts.new_full((len(rows), width), pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, start) in enumerate(zip(rows, starts)):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
        labels[i, start : len(row)] = row[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def completion_source(args: Any, student: nn.Module, task: str, teachers: Sequence[nn.Module], cached: bool,
                      sharded: bool, processing_class: Any = None,
                      train_dataset: Any = None) -> CompletionSource | None:
    """The run's :class:`CompletionSource` when ``args.lmbda > 0`` or ``args.seq_kd`` (else None), after the checks
    that can fail before training: prompt-only data trains on generated completions only, a causal-LM student, a
    teacher to generate with ``seq_kd`` (not a cache, not sharded), and a pad and an EOS token."""
    if args.lmbda < 1 and not args.seq_kd and lacks_completions(train_dataset):
        raise ValueError(f"The train rows are prompts without completions, and lmbda={args.lmbda} with seq_kd=False "
                         "trains some steps on the dataset's completions. Set lmbda=1 or seq_kd=True, or give the "
                         "rows a `completion`.")
    if not args.lmbda and not args.seq_kd:
        return None
    setting = "lmbda" if args.lmbda else "seq_kd"
    if task != "causal_lm":
        raise ValueError(f"`{setting}` generates completions, which needs a causal-LM student; this one is a "
                         f"{task} model. Set lmbda=0 and seq_kd=False.")
    if cached:
        raise ValueError(f"`{setting}` trains on newly generated completions, which a teacher cache cannot cover. "
                         "Distil from the live teacher (teacher_model=...), or set lmbda=0 and seq_kd=False.")
    if args.seq_kd and not teachers:
        raise ValueError("`seq_kd=True` generates the completions with the teacher: pass teacher_model=...")
    if args.seq_kd and sharded:
        raise ValueError("`seq_kd=True` generates with the teacher, and a sharded teacher (teacher_sharding) does not "
                         "generate here. Set teacher_sharding='none', or seq_kd=False.")
    config = getattr(student, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None and processing_class is not None:
        eos = getattr(processing_class, "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(processing_class, "pad_token_id", None) if processing_class is not None else None
    pad = pad if pad is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else None)
    if pad is None or not eos:
        raise ValueError(f"`{setting}` generates completions that stop at EOS and are padded: give the student's "
                         "generation_config an eos_token_id (and pad_token_id), or pass processing_class=tokenizer.")
    settings = GenerationSettings(args.max_new_tokens, args.generation_temperature, args.top_p, args.top_k,
                                  args.generation_batch_size)
    return CompletionSource(args.lmbda, args.seq_kd, settings, args.seed, pad, eos)

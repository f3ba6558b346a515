"""One normalisation rule for every loss term: the loss of an optimizer step is the loss over its **global batch**,
all micro-batches of the step (gradient accumulation) on all processes, however that batch is split.

How the trainer applies it: before the micro-batches of a step run, it counts the global batch once (samples,
non-padding tokens, logit rows; one small all-reduce per step) and hands each distiller the micro-batch as a
:class:`StepBatch` carrying those counts. Every term a distiller returns is read as **a mean over the samples of the
micro-batch it received**, and the trainer weights it by the micro-batch's share of the global batch,
``n_b / N`` (times the number of processes, whose gradients DDP averages). So:

- a per-sample term written the obvious way, ``per_sample_loss.mean()``, is exactly split-invariant;
- a per-token term reduces with :func:`token_mean` (over the positions where ``attention_mask`` is 1): it divides by
  the token count of the whole global batch (rescaled by the share), so the step's loss is the mean over every
  valid token of the step, not a mean of micro-batch means; the logit row pass does the same with
  :func:`denominator` over its rows (classifier samples, predicted tokens of a causal LM);
- a term defined on the samples of one batch (relations between samples, contrasts against the batch) is computed
  per micro-batch and weighted by its share: exact for equal micro-batches, a share-weighted mean otherwise. Such
  distillers set ``Distiller.batch_level = True`` and say so in their docstrings.

Outside the trainer (a plain dict batch) every helper is the plain mean over the batch itself, so a distiller called
on its own returns what the trainer logs for a step of that one batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .row_loss import causal_lm_targets

Unit = Literal["tokens", "rows"]


@dataclass(frozen=True)
class StepCounts:
    """Counts over the global batch of one optimizer step (all micro-batches, all processes that share it)."""

    samples: torch.Tensor
    tokens: torch.Tensor  # positions with attention_mask == 1 (0 when batches carry no attention mask)
    rows: torch.Tensor  # logit rows: samples of a classifier, predicted (shifted, label != -100) tokens of a causal LM


class StepBatch(dict):
    """The batch a distiller receives inside the trainer: the micro-batch's inputs, plus ``counts`` of the step's
    global batch (``None`` in evaluation, where every batch is normalised on its own)."""

    def __init__(self, inputs: Mapping[str, Any], counts: StepCounts | None) -> None:
        super().__init__(inputs)
        self.counts = counts


def batch_size(batch: Mapping[str, Any]) -> int:
    """Samples in ``batch``: the leading size of its first tensor with one."""
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 1


def local_counts(batch: Mapping[str, Any], task: str) -> torch.Tensor:
    """``[samples, tokens, rows]`` (int64) of one micro-batch, counted exactly as :func:`token_mean` and the row pass
    do, on the batch's device and without reading values back (no synchronisation)."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    device = next((v.device for v in batch.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    samples = torch.tensor(batch_size(batch), device=device)
    tokens = mask.sum() if isinstance(mask, torch.Tensor) else torch.zeros((), dtype=torch.int64, device=device)
    rows = samples
    if task == "causal_lm" and isinstance(ids, torch.Tensor):
        rows = causal_lm_targets(batch.get("labels"), mask, ids, ids.shape)[0].sum()
    return torch.stack([samples, tokens, rows]).to(torch.int64)


def step_counts(batches: Sequence[Mapping[str, Any]], task: str, device: torch.device, reduce=None) -> StepCounts:
    """The :class:`StepCounts` of a step's micro-batches; ``reduce`` sums a tensor over processes (or ``None``)."""
    totals = torch.stack([local_counts(b, task).to(device) for b in batches]).sum(0)
    if reduce is not None:
        totals = reduce(totals)
    samples, tokens, rows = totals.float().unbind()
    return StepCounts(samples=samples, tokens=tokens, rows=rows)


def share(batch: Mapping[str, Any]) -> float | torch.Tensor:
    """The micro-batch's share of the step's global batch, ``n_b / N`` (1 outside a training step)."""
    counts = getattr(batch, "counts", None)
    if counts is None:
        return 1.0
    return batch_size(batch) / counts.samples


def denominator(batch: Mapping[str, Any], unit: Unit, local: int | torch.Tensor) -> float | torch.Tensor:
    """What a sum over this micro-batch's ``unit``\\ s is divided by so that, once the trainer weights it by
    :func:`share`, the step's loss is the sum over the global batch divided by the global count.

    ``N_unit * n_b / N`` inside a training step, the micro-batch's own count ``local`` outside; never below one, so a
    batch with nothing to count (e.g. all labels -100) contributes zero.
    """
    counts = getattr(batch, "counts", None)
    if counts is None:
        return max(float(local), 1.0) if not isinstance(local, torch.Tensor) else local.clamp_min(1.0)
    return getattr(counts, unit).clamp_min(1.0) * share(batch)


def token_mean(values: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """Mean of per-position values ``[B, T]`` over the non-padding tokens of the global batch (see module doc).

    Padding is ``attention_mask == 0``; without an attention mask every position counts and all samples have the
    same number of positions (vision patches), so the plain mean is already exact.
    """
    mask = batch.get("attention_mask")
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(
            f"token_mean takes one value per position, [batch, tokens] like the attention_mask "
            f"{tuple(mask.shape)}; got {tuple(values.shape)} (average other dimensions first)."
        )
    mask = mask.to(values.dtype)
    return (values * mask).sum() / denominator(batch, "tokens", mask.sum())


def batch_mean(values: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss of per-sample values ``[B]`` (their mean) or per-position values ``[B, T]`` (:func:`token_mean`)."""
    if values.dim() == 2:
        return token_mean(values, batch)
    if values.dim() != 1:
        raise ValueError(f"batch_mean takes [batch] or [batch, tokens] values, got shape {tuple(values.shape)}.")
    return values.mean()

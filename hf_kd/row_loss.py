"""Losses that are a sum over rows of logits: samples of a classifier, tokens of a causal LM.

Every logit distiller is a per-row function ``f(student_logits, teacher_logits, targets) -> [n]``. This module
evaluates any number of them (plus the student's own cross-entropy) in **one** pass over the rows, in chunks:

- rows are picked first (the causal shift and ``labels == -100`` for LMs), so padding costs nothing;
- each chunk is upcast to fp32 on its own, so no ``[B, T, V]`` fp32 tensor ever exists;
- logits may come from a logits tensor or be formed chunk by chunk from the input of a linear output head, so on
  the fused causal-LM path neither model holds ``[B, T, V]`` logits at all;
- gradients are taken chunk by chunk during the forward pass and handed out in backward (no recomputation, no
  saved per-chunk activations): peak memory is one chunk, and the work equals the unchunked computation.

The result is ``sum_k w_k * sum_rows f_k / normalizer`` (differentiable) together with each unweighted term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .capture import ModelView

RowFn = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]


@dataclass
class RowTerm:
    """One per-row loss with its current weight; ``fn(student, teacher, targets)`` returns ``[n]``."""

    name: str
    fn: RowFn
    weight: float


@dataclass
class LogitSource:
    """Where one model's logits for a set of rows come from.

    ``values`` is ``[..., D]``: logits (``D = V``) or, with ``head_weight``, the head's input (``D = H``), in which
    case logits are ``values @ head_weight.T + head_bias``. Only the first ``vocab_size`` logits are used (a padded
    vocabulary is cut to the size shared with the other model).
    """

    values: torch.Tensor
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.values.reshape(-1, self.values.shape[-1]), self.head_weight, self.head_bias)


def causal_lm_rows(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices into ``[B * T]`` of the positions that predict a token, and the token they predict.

    Position ``t`` predicts token ``t + 1`` (the causal shift). With labels, positions whose next label is -100 are
    dropped; without labels, positions whose next token is padding (``attention_mask == 0``) are dropped and the
    next input id is the target.
    """
    batch, length = shape[0], shape[1]
    if labels is not None:
        targets = labels[:, 1:]
        valid = targets != -100
    else:
        targets = input_ids[:, 1:] if input_ids is not None else None
        valid = (
            attention_mask[:, 1:].bool()
            if attention_mask is not None
            else torch.ones(batch, length - 1, dtype=torch.bool, device=_device_of(labels, input_ids))
        )
    positions = torch.arange(batch * length, device=valid.device).view(batch, length)[:, :-1]
    rows = positions[valid]
    return rows, (targets[valid] if targets is not None else None)


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)


def _logits(values, weight, bias, rows, vocab_size):
    x = values[rows]
    if weight is not None:
        x = F.linear(x, weight[:vocab_size], None if bias is None else bias[:vocab_size])
    return x[..., :vocab_size].float()


def _row_pass(terms, student, teacher, rows, targets, vocab_size, chunk_size, normalizer, compute_grads):
    """Evaluate all terms chunk by chunk; returns per-term sums / normalizer and, if asked, the input gradients."""
    inputs = [*student, *teacher]
    wants = [compute_grads and t is not None and t.requires_grad for t in inputs]
    grads = [torch.zeros_like(t) if want else None for t, want in zip(inputs, wants)]
    sums = torch.zeros(len(terms), dtype=torch.float32, device=rows.device)
    weights = [term.weight for term in terms]
    for begin in range(0, rows.numel(), chunk_size):
        chunk = rows[begin : begin + chunk_size]
        chunk_targets = None if targets is None else targets[begin : begin + chunk_size]
        with torch.set_grad_enabled(any(wants)):
            leaves = [t.detach().requires_grad_() if want else t for t, want in zip(inputs, wants)]
            s_logits = _logits(*leaves[:3], chunk, vocab_size)
            t_logits = None if leaves[3] is None else _logits(*leaves[3:], chunk, vocab_size)
            per_term = torch.stack([term.fn(s_logits, t_logits, chunk_targets).sum() for term in terms])
            sums += per_term.detach()
            if any(wants):
                weighted = (per_term * per_term.new_tensor(weights)).sum() / normalizer
                needed = [leaf for leaf, want in zip(leaves, wants) if want]
                for grad, part in zip([g for g in grads if g is not None], torch.autograd.grad(weighted, needed)):
                    grad += part
    return sums / normalizer, grads


class _RowLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *inputs):
        terms, rows, targets, vocab_size, chunk_size, normalizer, n_student = spec
        values, grads = _row_pass(
            terms, inputs[:n_student], inputs[n_student:], rows, targets, vocab_size, chunk_size, normalizer, True
        )
        ctx.save_for_backward(*[g if g is not None else torch.empty(0) for g in grads])
        ctx.present = [g is not None for g in grads]
        total = (values * values.new_tensor([t.weight for t in terms])).sum()
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, grad_values):
        grads = [g * grad_total if present else None for g, present in zip(ctx.saved_tensors, ctx.present)]
        return (None, *grads)


def row_losses(
    terms: Sequence[RowTerm],
    student: LogitSource,
    teacher: LogitSource | None,
    rows: torch.Tensor,
    targets: torch.Tensor | None,
    vocab_size: int,
    normalizer: float | torch.Tensor,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_k w_k * L_k, {name_k: L_k})`` with ``L_k = sum_rows fn_k / normalizer``.

    ``rows`` index the flattened leading dimensions of the sources; ``targets`` (one per row) are the labels the
    terms may read. Gradients flow to every source tensor that requires grad (the student's logits or head input
    and head weights; the teacher's too when it is trained online).
    """
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(rows.device, torch.float32)
    s_inputs = student.tensors()
    t_inputs = teacher.tensors() if teacher is not None else (None, None, None)
    inputs = (*s_inputs, *t_inputs)
    spec = (list(terms), rows, targets, vocab_size, chunk_size, normalizer, len(s_inputs))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        total, values = _RowLossFunction.apply(spec, *inputs)
    else:
        values, _ = _row_pass(terms, s_inputs, t_inputs, rows, targets, vocab_size, chunk_size, normalizer, False)
        total = (values * values.new_tensor([t.weight for t in terms])).sum()
    return total, {term.name: value for term, value in zip(terms, values.unbind())}


@dataclass
class RowBatch:
    """The rows of one batch that row losses run over, and where both models' logits for them come from."""

    student: LogitSource
    teacher: LogitSource | None
    rows: torch.Tensor
    targets: torch.Tensor | None
    vocab_size: int


def rows_from_views(student: "ModelView", teacher: "ModelView | None", batch) -> RowBatch:
    """Rows of a classifier batch (one per sample) or a causal-LM batch (one per predicted token)."""
    source_s = _source(student)
    source_t = _source(teacher) if teacher is not None else None
    widths = [_width(student)] + ([_width(teacher)] if teacher is not None else [])
    leading = source_s.values.shape[:-1]
    labels = batch.get("labels")
    if student.task == "causal_lm":
        rows, targets = causal_lm_rows(labels, batch.get("attention_mask"), batch.get("input_ids"), leading)
    else:
        rows = torch.arange(leading.numel(), device=source_s.values.device)
        targets = labels.reshape(-1) if labels is not None else None
    return RowBatch(source_s, source_t, rows, targets, min(widths))


def _source(view: "ModelView") -> LogitSource:
    if view.logits is not None:
        return LogitSource(view.logits)
    if view.head_input is None or view.head is None:
        raise ValueError(f"{type(view.model).__name__} exposed neither logits nor the input of its output head.")
    return LogitSource(view.head_input, view.head.weight, view.head.bias)


def _width(view: "ModelView") -> int:
    return view.logits.shape[-1] if view.logits is not None else view.head.out_features

"""Losses that are a sum over rows of logits: samples of a classifier, tokens of a causal LM.

Every logit distiller is a per-row function ``f(student_logits, teacher_logits, targets) -> [n]``. This module
evaluates any number of them (plus the student's own cross-entropy) in **one** pass over the rows, in chunks:

- rows are picked first (the causal shift and ``labels == -100`` for LMs), so padding costs nothing;
- each chunk is upcast to fp32 on its own, so no ``[B, T, V]`` fp32 tensor ever exists;
- logits may come from a logits tensor or be formed chunk by chunk from the input of a linear output head, so on
  the fused causal-LM path neither model holds ``[B, T, V]`` logits at all; a teacher read from a top-k cache is
  :class:`~hf_kd.sparse_logits.SparseLogits`, handed as it is to the terms that read it so (``sparse_teacher``) and
  made dense one chunk at a time for the others;
- gradients are taken chunk by chunk during the forward pass and handed out in backward (no recomputation, no
  saved per-chunk activations): peak memory is one chunk, and the work equals the unchunked computation.

The result is ``sum_k w_k * sum_rows f_k / normalizer`` (differentiable) together with each unweighted term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .sparse_logits import SparseLogits

if TYPE_CHECKING:
    from .capture import ModelView

RowFn = Callable[[torch.Tensor, "torch.Tensor | list[torch.Tensor] | None", "torch.Tensor | None"], torch.Tensor]


@dataclass
class RowTerm:
    """One per-row loss with its current weight; ``fn(student, teacher, targets)`` returns ``[n]``. With several
    teachers (a list of sources) ``teacher`` is the list of their chunk logits. ``parameters`` are tensors the loss
    reads besides the logits (e.g. learned teacher weights): they get their gradients too. ``sparse_teacher``: ``fn``
    reads a top-k teacher (:class:`~hf_kd.sparse_logits.SparseLogits`) as it is; otherwise it gets the dense logits
    that stands for."""

    name: str
    fn: RowFn
    weight: float
    parameters: tuple[torch.Tensor, ...] = ()
    sparse_teacher: bool = False


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


def causal_lm_targets(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(valid, targets)``, both ``[B, T - 1]``: which positions predict a token, and the token they predict.

    Position ``t`` predicts token ``t + 1`` (the causal shift). With labels, positions whose next label is -100 are
    not valid; without labels, positions whose next token is padding (``attention_mask == 0``) are not, and the next
    input id is the target.
    """
    if labels is not None:
        targets = labels[:, 1:]
        return targets != -100, targets
    targets = input_ids[:, 1:] if input_ids is not None else None
    if attention_mask is not None:
        return attention_mask[:, 1:].bool(), targets
    return torch.ones(shape[0], shape[1] - 1, dtype=torch.bool, device=_device_of(labels, input_ids)), targets


def causal_lm_rows(
    labels: torch.Tensor | None, attention_mask: torch.Tensor | None, input_ids: torch.Tensor | None, shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices into ``[B * T]`` of the positions that predict a token (:func:`causal_lm_targets`), and the
    token they predict."""
    valid, targets = causal_lm_targets(labels, attention_mask, input_ids, shape)
    batch, length = shape[0], shape[1]
    positions = torch.arange(batch * length, device=valid.device).view(batch, length)[:, :-1]
    return positions[valid], (targets[valid] if targets is not None else None)


def _device_of(*tensors: torch.Tensor | None) -> torch.device:
    return next(t.device for t in tensors if t is not None)


ELEMENTS_PER_CHUNK = 2**23  # fp32 logits per chunk (32 MiB): ~170 tokens at a 49k vocabulary, all of a classifier


def rows_per_chunk(vocab_size: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit ``ELEMENTS_PER_CHUNK`` logits."""
    return chunk_size if chunk_size is not None else max(1, ELEMENTS_PER_CHUNK // vocab_size)


def _source_tensors(source: LogitSource | SparseLogits | None) -> tuple[torch.Tensor | None, ...]:
    """The three tensors a source enters the row pass as: a sparse one's values, indices and rest, row-flattened."""
    if source is None:
        return (None, None, None)
    if isinstance(source, SparseLogits):
        flat = source.flat()
        return (flat.values, flat.indices, flat.rest)
    return source.tensors()


def _chunk_logits(values, weight, bias, chunk, vocab_size, sparse_width):
    """``(x, z)``: the chunk's rows of ``values`` and their fp32 logits, without autograd history; for a sparse source
    (``sparse_width`` set; ``weight`` and ``bias`` are its indices and rest) ``z`` is the chunk's ``SparseLogits``."""
    if sparse_width is not None:
        return None, SparseLogits(values[chunk].float(), weight[chunk], bias[chunk], sparse_width)
    with torch.no_grad():
        x = values[chunk]
        z = x if weight is None else F.linear(x, weight[:vocab_size], None if bias is None else bias[:vocab_size])
        return x, z[..., :vocab_size].float()


def _row_pass(terms, sources, rows, targets, vocab_size, chunk_size, normalizer, grads, multi, param_grads, sparse):
    """Evaluate all terms chunk by chunk: per-term sums / normalizer.

    ``sources`` are the student's ``(values, head_weight, head_bias)`` and then each teacher's (``multi``: the terms
    receive the teachers' chunk logits as a list). ``grads`` holds, per source, accumulators for those three
    (``None`` where no gradient is wanted); ``param_grads`` one per term parameter (or ``None``). Each chunk's
    gradient is taken with respect to its fp32 logits only and pushed back by hand: ``dvalues[rows] = g @ W`` (or
    ``g`` itself for logits), ``dW += g^T x``, ``db += sum g`` — so nothing of full size is built per chunk.
    ``sparse`` holds, per source, the width of a sparse (top-k) source, else None.
    """
    sums = torch.zeros(len(terms), dtype=torch.float32, device=rows.device)
    weights = torch.tensor([term.weight for term in terms], dtype=torch.float32, device=rows.device)
    wanted = [any(g is not None for g in source_grads) for source_grads in grads]
    params = [p for term in terms for p in term.parameters]
    wanted_params = [p for p, g in zip(params, param_grads) if g is not None]
    for begin in range(0, rows.numel(), chunk_size):
        chunk = rows[begin : begin + chunk_size]
        chunk_targets = None if targets is None else targets[begin : begin + chunk_size]
        chunks = [_chunk_logits(*source, chunk, vocab_size, width) if source[0] is not None else (None, None)
                  for source, width in zip(sources, sparse)]
        logits = [z.requires_grad_() if want else z for (_, z), want in zip(chunks, wanted)]
        teacher = logits[1:] if multi else logits[1]
        dense = teacher
        if any(not term.sparse_teacher for term in terms) and any(w is not None for w in sparse[1:]):
            dense = [_dense(z) for z in teacher] if multi else _dense(teacher)
        with torch.enable_grad() if any(wanted) or wanted_params else torch.no_grad():
            per_term = torch.stack([term.fn(logits[0], teacher if term.sparse_teacher else dense, chunk_targets).sum()
                                    for term in terms])
            weighted = (per_term * weights).sum() / normalizer
        sums += per_term.detach()
        if not any(wanted) and not wanted_params:
            continue
        needed = [z for z, want in zip(logits, wanted) if want]
        chunk_grads = iter(torch.autograd.grad(weighted, needed + wanted_params, allow_unused=True))
        for (_values, weight, _), (x, _), source_grads, want in zip(sources, chunks, grads, wanted):
            if want:
                _accumulate(next(chunk_grads), x, weight, chunk, vocab_size, *source_grads)
        for accumulator in (g for g in param_grads if g is not None):
            grad = next(chunk_grads)
            if grad is not None:
                accumulator += grad
    return sums / normalizer


def _dense(z):
    return z.dense() if isinstance(z, SparseLogits) else z


def _accumulate(g, x, weight, chunk, vocab_size, grad_values, grad_weight, grad_bias):
    if weight is None:  # the source is logits
        if grad_values is not None:
            grad_values[chunk, :vocab_size] = g.to(grad_values.dtype)
        return
    if grad_values is not None:
        grad_values[chunk] = (g @ weight[:vocab_size].detach().float()).to(grad_values.dtype)
    if grad_weight is not None:
        grad_weight[:vocab_size].addmm_(g.t(), x.float())
    if grad_bias is not None:
        grad_bias[:vocab_size] += g.sum(0)


class _RowLossFunction(torch.autograd.Function):
    """``sum_k w_k L_k`` with gradients computed during the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, spec, *inputs):
        terms, rows, targets, vocab_size, chunk_size, normalizer, multi, n_sources, sparse = spec
        sources = [inputs[i : i + 3] for i in range(0, 3 * n_sources, 3)]
        params = inputs[3 * n_sources :]
        grads = [[_zeros_for(t) if t is not None and t.requires_grad else None for t in source] for source in sources]
        param_grads = [_zeros_for(p) if p.requires_grad else None for p in params]
        values = _row_pass(terms, sources, rows, targets, vocab_size, chunk_size, normalizer, grads, multi,
                           param_grads, sparse)
        ctx.grads = [g for source_grads in grads for g in source_grads] + param_grads
        ctx.dtypes = [None if t is None else t.dtype for t in inputs]
        ctx.mark_non_differentiable(values)
        return (values * values.new_tensor([t.weight for t in terms])).sum(), values

    @staticmethod
    def backward(ctx, grad_total, grad_values):
        grads = [None if g is None else g.mul_(grad_total).to(dtype) for g, dtype in zip(ctx.grads, ctx.dtypes)]
        ctx.grads = None
        return (None, *grads)


def _zeros_for(tensor: torch.Tensor) -> torch.Tensor:
    """Gradient accumulator: the tensor's own dtype for activations, fp32 for (possibly low-precision) weights."""
    dtype = torch.float32 if isinstance(tensor, torch.nn.Parameter) else tensor.dtype
    return torch.zeros(tensor.shape, dtype=dtype, device=tensor.device)


def row_losses(
    terms: Sequence[RowTerm],
    student: LogitSource,
    teacher: LogitSource | SparseLogits | Sequence[LogitSource | SparseLogits] | None,
    rows: torch.Tensor,
    targets: torch.Tensor | None,
    vocab_size: int,
    normalizer: float | torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(sum_k w_k * L_k, {name_k: L_k})`` with ``L_k = sum_rows fn_k / normalizer``.

    ``rows`` index the flattened leading dimensions of the sources; ``targets`` (one per row) are the labels the
    terms may read. ``teacher`` is one source, or a list of sources whose chunk logits the terms receive as a list
    (several teachers); a teacher may be :class:`~hf_kd.sparse_logits.SparseLogits` (a top-k cache) of width
    ``vocab_size``. Gradients flow to every source tensor that requires grad (the student's logits or head input
    and head weights; a teacher's too when it is trained online) and to the terms' ``parameters``. ``chunk_size``
    rows per chunk (default: as many as fit ``ELEMENTS_PER_CHUNK`` logits).
    """
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    chunk_size = rows_per_chunk(vocab_size, chunk_size)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(rows.device, torch.float32)
    multi = isinstance(teacher, Sequence)
    teachers = list(teacher) if multi else [teacher]
    sparse = tuple(s.width if isinstance(s, SparseLogits) else None for s in (student, *teachers))
    if any(width not in (None, vocab_size) for width in sparse):
        raise ValueError(f"A top-k teacher of width {max(w for w in sparse if w)} cannot be read over a vocabulary of "
                         f"{vocab_size}: the student's logits and the cache must have the same width.")
    inputs = tuple(t for source in (student, *teachers) for t in _source_tensors(source))
    params = tuple(p for term in terms for p in term.parameters)
    weights = [t.weight for t in terms]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*inputs, *params))
    n_sources = len(inputs) // 3
    if not needs_grad:
        values = _row_pass(terms, [inputs[i : i + 3] for i in range(0, len(inputs), 3)], rows, targets, vocab_size,
                           chunk_size, normalizer, [[None] * 3] * n_sources, multi, [None] * len(params), sparse)
        total = (values * values.new_tensor(weights)).sum()
    elif all(inputs[i + 1] is None for i in range(0, len(inputs), 3)) and rows.numel() <= chunk_size:
        # One small chunk of logits (classifiers): plain autograd is cheaper than the chunked machinery.
        logits = [None if inputs[i] is None else inputs[i][rows][..., :vocab_size].float()
                  for i in range(0, len(inputs), 3)]
        t_logits = logits[1:] if multi else logits[1]
        per_term = torch.stack([term.fn(logits[0], t_logits, targets).sum() for term in terms]) / normalizer
        total, values = (per_term * per_term.new_tensor(weights)).sum(), per_term.detach()
    else:
        spec = (list(terms), rows, targets, vocab_size, chunk_size, normalizer, multi, n_sources, sparse)
        total, values = _RowLossFunction.apply(spec, *inputs, *params)
    return total, {term.name: value for term, value in zip(terms, values.unbind())}


def row_values(
    fns: Sequence[RowFn],
    student: LogitSource,
    teacher: LogitSource | SparseLogits,
    rows: torch.Tensor,
    vocab_size: int,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``[n, len(fns)]`` fp32: ``fn(student_logits, teacher_logits, None)`` of every row, chunk by chunk, without
    autograd (a per-row reading of what :func:`row_losses` sums, e.g. evaluation metrics); a top-k teacher is read as
    the dense logits it stands for."""
    chunk_size = rows_per_chunk(vocab_size, chunk_size)
    sources = [(_source_tensors(source), source.width if isinstance(source, SparseLogits) else None)
               for source in (student, teacher)]
    out = []
    with torch.no_grad():
        for begin in range(0, rows.numel(), chunk_size):
            chunk = rows[begin : begin + chunk_size]
            s, t = (_dense(_chunk_logits(*tensors, chunk, vocab_size, width)[1]) for tensors, width in sources)
            out.append(torch.stack([fn(s, t, None).float() for fn in fns], dim=-1))
    return torch.cat(out) if out else torch.zeros(0, len(fns), device=rows.device)


@dataclass
class RowBatch:
    """The rows of one batch that row losses run over, and where the models' logits for them come from (``teacher``:
    one source, or a list with several teachers)."""

    student: LogitSource
    teacher: LogitSource | SparseLogits | list[LogitSource | SparseLogits] | None
    rows: torch.Tensor
    targets: torch.Tensor | None
    vocab_size: int


def rows_from_views(student: ModelView, teacher: ModelView | Sequence[ModelView] | None, batch) -> RowBatch:
    """Rows of a classifier batch (one per sample) or a causal-LM batch (one per predicted token); ``teacher`` may be
    a list of views (several teachers), and the vocabulary is the one all models share."""
    teachers = list(teacher) if isinstance(teacher, Sequence) else [] if teacher is None else [teacher]
    source_s = _source(student)
    sources_t = [_source(view) for view in teachers]
    widths = [_width(view) for view in (student, *teachers)]
    leading = source_s.values.shape[:-1]
    labels = batch.get("labels")
    if student.task == "causal_lm":
        rows, targets = causal_lm_rows(labels, batch.get("attention_mask"), batch.get("input_ids"), leading)
    else:
        rows = torch.arange(leading.numel(), device=source_s.values.device)
        targets = labels.reshape(-1) if labels is not None else None
    source_t = sources_t if isinstance(teacher, Sequence) else (sources_t[0] if sources_t else None)
    return RowBatch(source_s, source_t, rows, targets, min(widths))


def _source(view: ModelView) -> LogitSource | SparseLogits:
    if view.sparse_logits is not None:
        return view.sparse_logits
    if view.logits is not None:
        return LogitSource(view.logits)
    if view.head_input is None or view.head is None:
        raise ValueError(f"{type(view.model).__name__} exposed neither logits nor the input of its output head.")
    return LogitSource(view.head_input, view.head.weight, view.head.bias)


def _width(view: ModelView) -> int:
    if view.sparse_logits is not None:
        return view.sparse_logits.width
    return view.logits.shape[-1] if view.logits is not None else view.head.out_features

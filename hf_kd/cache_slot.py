"""The teacher of a run that reads an offline cache (``teacher_cache=``): no model, the teacher view of a batch made
from the cache rows of its samples.

Rows are matched by the train dataset's sample index (:mod:`hf_kd.sample_index`), so any sampler order, any number
of epochs and a resumed run read the right row; before training :func:`check_cache` compares every train row's
fingerprint with the cache's, so a cache of other data, tokenization or truncation is refused. The view holds the
teacher's logits, or for a top-k cache the :class:`~hf_kd.sparse_logits.SparseLogits` of its rows (``[B, T, k]``:
no ``[B, T, V]`` tensor is formed), so every logit distiller and the fused causal-LM path of the student read it as
they read a live teacher; distillers that need more than the teacher's logits are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import transformers
from torch import nn

from .architecture import SAMPLE_INDEX, Task, logits_width, num_layers
from .cache import hidden_column, load_teacher_cache, row_fingerprint, tokenizer_hash
from .capture import CachedLayers, ModelView
from .row_loss import causal_lm_rows
from .sparse_logits import SparseLogits


def open_cache(cache: str | Path | datasets.Dataset) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The rows and metadata of ``teacher_cache``: a folder written by ``cache_teacher_outputs``, or the dataset it
    returned (its folder is where its Arrow files are)."""
    if isinstance(cache, datasets.Dataset):
        if not cache.cache_files:
            raise ValueError("`teacher_cache` is an in-memory dataset; pass the folder cache_teacher_outputs wrote "
                             "(or the dataset it returned).")
        cache = Path(cache.cache_files[0]["filename"]).parent
    return load_teacher_cache(cache)


def check_cache(metadata: Mapping[str, Any], rows: datasets.Dataset, train_dataset: Any, student: nn.Module,
                tokenizer: Any = None) -> None:
    """The cache was built for this training data, tokenizer and student head; else an error naming
    ``teacher_cache`` and what differs."""
    width = logits_width(student)
    if metadata["logits_width"] != width:
        raise ValueError(f"`teacher_cache` holds logits of width {metadata['logits_width']} and the student has "
                         f"{width}; build the cache with a teacher of the student's classes / vocabulary.")
    built_with = metadata.get("tokenizer_sha256")  # None: built without a tokenizer (an image processor's run)
    if tokenizer is not None and built_with is not None and built_with != tokenizer_hash(tokenizer):
        raise ValueError("`teacher_cache` was built with another tokenizer than this trainer's processing_class; "
                         "rebuild it with cache_teacher_outputs(..., tokenizer=<this tokenizer>).")
    if train_dataset is None or len(train_dataset) != metadata["num_rows"]:
        raise ValueError(f"`teacher_cache` holds {metadata['num_rows']} rows and the train dataset has "
                         f"{None if train_dataset is None else len(train_dataset)}; the cache must be built over "
                         "this train dataset, in its order.")
    plain = train_dataset.with_format(None) if isinstance(train_dataset, datasets.Dataset) else train_dataset
    columns = metadata["fingerprint_columns"]
    for index, (row, fingerprint) in enumerate(zip(plain, rows["fingerprint"], strict=True)):
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"`teacher_cache` was built from rows with columns {columns}; the train dataset lacks "
                             f"{missing}.")
        if row_fingerprint(row, columns) != fingerprint:
            raise ValueError(
                f"`teacher_cache` does not match train row {index}: its inputs ({', '.join(columns)}) differ from "
                "the ones the cache was built from (other data, order, tokenization or max_length). Rebuild it with "
                "cache_teacher_outputs over this train dataset."
            )


def refuse_uncached(named: Sequence[tuple[str, nn.Module]], metadata: Mapping[str, Any] | None = None) -> None:
    """Only distillers that read the teacher's logits, and its hidden states when the cache holds some
    (``metadata["hidden_states"]``; which layers is checked when they are read), can train from a cache."""
    has_hidden = bool(metadata and metadata.get("hidden_states"))
    for key, distiller in named:
        if not distiller.requires.teacher:
            continue
        needs = [what for what, on in (("hidden states", distiller.requires.hidden_states and not has_hidden),
                                       ("attention maps", distiller.requires.attentions),
                                       ("module features", bool(distiller.teacher_features())),
                                       ("several teachers", distiller.multi_teacher),
                                       ("trainable teacher parameters", bool(list(distiller.teacher_parameters()))
                                        or distiller.family == "online"))
                 if on]
        if needs or not (hasattr(distiller, "row_loss") or has_hidden):
            what = ", ".join(needs) or "more than its logits"
            hint = (" Hidden states can be cached: cache_teacher_outputs(..., hidden_states=[layers])."
                    if needs == ["hidden states"] else "")
            raise ValueError(f"Distiller {key!r} reads the teacher's {what}, which `teacher_cache` does not hold (it "
                             f"holds logits{' and hidden states' if has_hidden else ''}); train it with "
                             f"teacher_model=..., or leave it out of this run.{hint}")


def stand_in_teacher(metadata: Mapping[str, Any]) -> nn.Module | None:
    """A weightless copy of the cached teacher (its transformers class built from the stored config on the meta
    device), for what needs only its shape: distillers' ``setup`` (projector widths, layer maps) and the class-order
    and vocabulary checks. ``None`` for a teacher that is not a transformers model."""
    model_class = getattr(transformers, metadata.get("teacher_class", ""), None)
    config = metadata.get("teacher_config")
    if model_class is None or config is None or not hasattr(model_class, "config_class"):
        return None
    config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        return model_class(config)


@dataclass(eq=False)
class CacheSlot:
    """The one teacher slot of a cached run, with :class:`~hf_kd.teachers.TeacherSlot`'s interface: it never runs a
    model (``model`` and ``bare`` are None), and :meth:`forward` reads the batch's rows."""

    readers: tuple[nn.Module, ...]
    rows: datasets.Dataset
    task: Task
    width: int
    top_k: int | None
    device: torch.device
    model: nn.Module | None = None  # the stand-in (weightless): views carry its config; it never runs
    hidden_layers: tuple[int, ...] = ()
    hidden_pooling: str | None = None
    hidden_count: int = 0  # entries of the teacher's hidden_states tuple
    index: int = 0
    role: str = "teacher (cache)"
    bare: None = None
    head: None = None
    cached: bool = True

    @classmethod
    def build(cls, rows: datasets.Dataset, metadata: Mapping[str, Any], readers: Sequence[nn.Module],
              device: torch.device, stand_in: nn.Module | None = None) -> CacheSlot:
        columns = ["logits"] if metadata["task"] == "classification" or metadata["top_k"] is None else [
            "topk_values", "topk_indices", "tail"]
        if metadata["task"] == "causal_lm":
            columns.append("positions")
        layers = tuple(metadata.get("hidden_states") or ())
        columns += [hidden_column(layer) for layer in layers]
        count = num_layers(stand_in) + 1 if stand_in is not None else max(layers, default=-1) + 1
        return cls(tuple(readers), rows.with_format("arrow", columns=columns), metadata["task"],
                   metadata["logits_width"], metadata["top_k"], device, stand_in, layers,
                   metadata.get("hidden_pooling"), count)

    @property
    def runs(self) -> bool:
        return bool(self.readers)

    def forward(self, batch: Mapping[str, Any], flags: Mapping[str, bool], fused: bool, training: bool) -> ModelView:
        if SAMPLE_INDEX not in batch:
            raise ValueError("A cached teacher is read by the train rows' sample index; this batch has none (an "
                             "evaluation batch: evaluation with teacher_cache runs the student alone).")
        entries = self.rows[batch[SAMPLE_INDEX].tolist()]  # a pyarrow Table: its columns are read flat
        view = self._logits_view(batch, entries)
        if not self.hidden_layers:
            return view
        return replace(view, **self._hidden(batch, entries))

    def _hidden(self, batch: Mapping[str, Any], entries: pa.Table) -> dict[str, Any]:
        """The view's ``hidden_states`` (:class:`~hf_kd.capture.CachedLayers`) and ``pooled_hidden``."""
        pooled = self.hidden_pooling != "tokens"
        what = (f"layers {list(self.hidden_layers)} of its {self.hidden_count} hidden states"
                + (f", pooled ({self.hidden_pooling!r})" if pooled else ", per token"))
        missing = ("`teacher_cache` holds the teacher's " + what + ", and a distiller reads hidden state {layer}"
                   + (" per token" if pooled else "") + ". Rebuild it with cache_teacher_outputs(..., hidden_states="
                   "[...], hidden_pooling=...) covering what the distillers read.")
        layers: list[torch.Tensor | None] = [None] * self.hidden_count
        if pooled:
            values = {(layer, self.hidden_pooling): _flat(entries, hidden_column(layer), 1).view(len(entries), -1)
                      .float().to(self.device) for layer in self.hidden_layers}
            return {"hidden_states": CachedLayers(layers, missing), "pooled_hidden": values}
        batch_size, length = batch["input_ids"].shape[:2] if "input_ids" in batch else (len(entries), None)
        for layer in self.hidden_layers:
            column = hidden_column(layer)
            counts = torch.from_numpy(pc.list_value_length(entries.column(column)).to_numpy().astype(np.int64))
            tokens = _flat(entries, column, 2).float()
            width = tokens.numel() // max(int(counts.sum()), 1)
            length = length if length is not None else int(counts.max())
            hidden = torch.zeros(batch_size * length, width)
            rows = torch.repeat_interleave(torch.arange(batch_size), counts)
            starts = torch.cumsum(counts, 0) - counts
            positions = torch.arange(len(rows)) - torch.repeat_interleave(starts, counts)
            hidden[rows * length + positions] = tokens.view(-1, width)  # each row's first tokens; padding stays 0
            layers[layer] = hidden.view(batch_size, length, width).to(self.device)
        return {"hidden_states": CachedLayers(layers, missing)}

    def _logits_view(self, batch: Mapping[str, Any], entries: pa.Table) -> ModelView:
        if self.task == "classification":
            logits = _flat(entries, "logits", 1).view(-1, self.width)
            return ModelView(model=self.model, task=self.task, logits=logits.float().to(self.device))
        mask = batch.get("attention_mask")
        if mask is not None and bool((mask[:, 0] == 0).any()):
            raise ValueError("A causal-LM `teacher_cache` stores positions of right-padded rows, and this batch is "
                             "left-padded: train with tokenizer.padding_side='right' (as the cache was built).")
        shape = batch["input_ids"].shape
        # per sample: how many predicting positions it has cached rows for, and which
        counts = torch.from_numpy(pc.list_value_length(entries.column("positions")).to_numpy().astype(np.int64))
        samples = torch.repeat_interleave(torch.arange(len(counts)), counts)
        cached = (samples * shape[1] + _flat(entries, "positions", 1).long()).to(self.device)  # into the [B * T] rows
        self._check_rows(batch, shape, cached)
        if self.top_k is None:
            logits = torch.zeros(shape.numel(), self.width, device=self.device)
            logits[cached] = _flat(entries, "logits", 2).view(-1, self.width).float().to(self.device)
            return ModelView(model=self.model, task=self.task, logits=logits.view(*shape, self.width))
        top = SparseLogits.from_tail(_flat(entries, "topk_values", 2).view(-1, self.top_k).to(self.device),
                                     _flat(entries, "topk_indices", 2).view(-1, self.top_k).to(self.device),
                                     _flat(entries, "tail", 1).to(self.device), self.width)
        rows = SparseLogits(top.values.new_zeros(shape.numel(), self.top_k),
                            top.indices.new_zeros(shape.numel(), self.top_k), top.rest.new_zeros(shape.numel()),
                            self.width)
        rows.values[cached], rows.indices[cached], rows.rest[cached] = top.values, top.indices, top.rest
        return ModelView(model=self.model, task=self.task, sparse_logits=SparseLogits(
            rows.values.view(*shape, -1), rows.indices.view(*shape, -1), rows.rest.view(shape), self.width))

    def _check_rows(self, batch: Mapping[str, Any], shape: torch.Size, cached: torch.Tensor) -> None:
        """Every token the losses read has a cached teacher row."""
        read, _ = causal_lm_rows(batch.get("labels"), batch.get("attention_mask"), batch.get("input_ids"), shape)
        covered = torch.zeros(shape.numel(), dtype=torch.bool, device=self.device)
        covered[cached] = True
        if not bool(covered[read.to(self.device)].all()):
            raise ValueError("`teacher_cache` has no teacher output for some predicted tokens of this batch: its rows "
                             "were cached from other labels or padding. Build it with the data_collator this "
                             "trainer uses (cache_teacher_outputs(..., data_collator=...)).")


def _flat(table: pa.Table, column: str, depth: int) -> torch.Tensor:
    """The values of a list column nested ``depth`` deep, flattened in row order (one copy, no per-row tensors)."""
    values = table.column(column)
    for _ in range(depth):
        values = pc.list_flatten(values)
    array = values.to_numpy()
    return torch.from_numpy(array.astype(np.int64) if array.dtype == np.uint16 else array)

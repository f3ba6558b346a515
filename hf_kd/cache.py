"""An offline teacher cache: the teacher run once over a dataset, its outputs saved beside it, so that later runs
read the teacher's targets instead of running the teacher.

The cache is a folder written by ``datasets.Dataset.save_to_disk`` with one row per dataset row, in order, plus the
metadata file :data:`METADATA` (``hf_kd_cache.json``). Columns by the teacher's task (:func:`~hf_kd.architecture.
task_of`):

- classifiers: ``logits`` ``[C]``, the full logits, in ``values_dtype``;
- causal LMs: one entry per *predicting* position ``t`` (its logits predict token ``t + 1``), kept where the shifted
  ``labels[t + 1] != -100`` (without labels: where ``attention_mask[t + 1] == 1``). ``positions`` ``[n]`` (int32,
  ``t`` in the row as the collator produced it), and with ``top_k = k``: ``topk_values`` ``[n, k]`` (the ``k``
  largest raw logits, descending, ``values_dtype``), ``topk_indices`` ``[n, k]`` (uint16 up to a 65,536-token
  vocabulary, else int32: :func:`index_dtype`) and ``tail`` ``[n]``
  (float32, the log of the probability mass outside the top ``k`` at temperature 1, see :func:`tail_log_mass`);
  with ``top_k = None``: ``logits`` ``[n, V]``, the full logits;
- with ``hidden_states=[l, ...]`` (layers as indices of the model's ``hidden_states`` tuple: 0 the embeddings, -1
  the last layer): ``hidden_<l>`` per layer (``l`` made non-negative), in ``values_dtype``. With
  ``hidden_pooling="tokens"`` the row's tokens ``[n, H]``, its first ``n`` positions where ``n`` is its number of
  non-padding tokens (right padding), for distillers that compare tokens (``hidden_states``); with ``"cls"``,
  ``"mean"`` or ``"last"`` one vector ``[H]`` per row, pooled as
  :func:`~hf_kd.distillers.representation.select_tokens` pools (``mean`` over non-padding tokens), for the
  relation distillers' ``embedding`` of that name and ``hidden_states`` with ``tokens`` of that name: about
  ``T`` times smaller;
- every row: ``fingerprint``, the first 16 hex digits of the sha256 of the row's input columns in canonical JSON
  (:func:`row_fingerprint`), so a reader checks cheaply that cache row ``i`` belongs to dataset row ``i``.

The metadata names the format version, the teacher (class, ``_name_or_path``, its config and a hash of it: a reader
builds a weightless stand-in of the teacher from it, so distillers size projectors and layer maps and the class
order is checked), the task, the logits width, ``top_k``, ``values_dtype``, the cached hidden layers and pooling,
the fingerprinted columns, the number of rows, a hash of all row fingerprints, the longest input and, when given, a
hash of the tokenizer. The teacher's weights are not hashed: a
teacher fine-tuned further under the same path and config must get a new ``output_dir``.

The build is resumable: it writes shards of ``shard_batches`` batches under ``<output_dir>.building/``, each saved
under a temporary name and renamed when complete; a run restarted with the same arguments continues after the last
complete shard. The cache itself is assembled in the staging folder, its metadata written last, and renamed to
``output_dir`` in one step, so a folder at ``output_dir`` with a metadata file is always complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import default_data_collator

from .architecture import accepted_inputs, logits_width, model_inputs, num_layers, task_of, unwrap
from .choices import check_choice
from .distillers.representation import select_tokens

FORMAT_VERSION = 2
METADATA = "hf_kd_cache.json"
_BUILDING = "building.json"  # the staging folder's arguments, for resuming

ValuesDtype = Literal["float16", "float32"]
HiddenPooling = Literal["tokens", "cls", "mean", "last"]


# ---- hashes ---------------------------------------------------------------------------------------------------
def _sha256(value: Any) -> str:
    """sha256 of ``value`` in canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def row_fingerprint(row: dict[str, Any], columns: Sequence[str]) -> str:
    """The first 16 hex digits of the sha256 of ``{column: row[column]}`` (raw python values) in canonical JSON."""
    return _sha256({column: row[column] for column in columns})[:16]


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the tokenizer's sorted vocabulary, or of its ``name_or_path`` and length without ``get_vocab``."""
    if callable(getattr(tokenizer, "get_vocab", None)):
        return _sha256(sorted(tokenizer.get_vocab().items()))
    return _sha256([getattr(tokenizer, "name_or_path", None), len(tokenizer)])


# ---- one batch ------------------------------------------------------------------------------------------------
def tail_log_mass(logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``log(1 - sum_{i in top-k} softmax(z)_i)`` per row of ``logits`` ``z`` ``[N, V]`` (``indices`` ``[N, k]``),
    computed stably as ``logsumexp_{i not in top-k} z_i - logsumexp_i z_i``; ``-inf`` when ``k = V``."""
    outside = logits.scatter(-1, indices, float("-inf"))
    return outside.logsumexp(-1) - logits.logsumexp(-1)


def _predicting_positions(batch: dict[str, torch.Tensor], length: int) -> torch.Tensor:
    """``[B, L - 1]`` bool: position ``t`` kept when the token it predicts, ``t + 1``, has a label (or, without
    labels, is not padding)."""
    if "labels" in batch:
        return batch["labels"][:, 1:] != -100
    if "attention_mask" in batch:
        return batch["attention_mask"][:, 1:] == 1
    return torch.ones(batch["input_ids"].shape[0], length - 1, dtype=torch.bool)


def hidden_column(layer: int) -> str:
    """The cache column of hidden layer ``layer`` (a non-negative index of the ``hidden_states`` tuple)."""
    return f"hidden_{layer}"


def _hidden_columns(hidden_states: Sequence[torch.Tensor], batch: dict[str, torch.Tensor], layers: Sequence[int],
                    pooling: str, dtype: np.dtype) -> dict[str, list[np.ndarray]]:
    """The ``hidden_<l>`` columns of one batch: each row's non-padding tokens, or its pooled vector."""
    mask = batch.get("attention_mask")
    if pooling != "tokens":
        return {hidden_column(layer): list(select_tokens(hidden_states[layer].float(), mask, pooling).cpu().numpy()
                                           .astype(dtype)) for layer in layers}
    shape = hidden_states[0].shape
    if mask is not None and bool((mask[:, 0] == 0).any()):
        raise ValueError("cache_teacher_outputs(hidden_pooling='tokens') stores each row's first tokens and this batch "
                         "is left-padded: pad on the right (tokenizer.padding_side='right').")
    lengths = (mask.sum(-1) if mask is not None else torch.full(shape[:1], shape[1])).tolist()
    return {hidden_column(layer): [row[:n].numpy().astype(dtype) for row, n in
                                   zip(hidden_states[layer].float().cpu(), lengths)] for layer in layers}


def _batch_columns(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str, top_k: int | None,
                   dtype: np.dtype) -> dict[str, list[np.ndarray]]:
    """The cache columns of one batch's float32 ``logits`` (one list entry per example)."""
    if task == "classification":
        return {"logits": list(logits.numpy().astype(dtype))}
    keep = _predicting_positions(batch, logits.shape[1])
    rows = logits[:, :-1][keep]  # [N, V], the examples' kept positions in order
    counts = keep.sum(-1).tolist()
    positions = [row.nonzero().squeeze(-1).numpy().astype(np.int32) for row in keep]
    if top_k is None:
        values = {"logits": rows.numpy().astype(dtype)}
    else:
        top, indices = rows.topk(top_k, dim=-1)
        values = {"topk_values": top.numpy().astype(dtype),
                  "topk_indices": indices.numpy().astype(index_dtype(logits.shape[-1])),
                  "tail": tail_log_mass(rows, indices).numpy()}
    columns: dict[str, list[np.ndarray]] = {name: np.split(array, np.cumsum(counts)[:-1])
                                            for name, array in values.items()}
    return {**columns, "positions": positions}


def index_dtype(width: int) -> str:
    """Token ids of a vocabulary of ``width``: ``uint16`` up to 65,536 (2 bytes per id), else ``int32``."""
    return "uint16" if width <= 2 ** 16 else "int32"


def _features(task: str, top_k: int | None, values_dtype: str, width: int, layers: Sequence[int],
              pooling: str) -> datasets.Features:
    rows = datasets.List(datasets.List(datasets.Value(values_dtype)))
    hidden = {hidden_column(layer): rows if pooling == "tokens" else datasets.List(datasets.Value(values_dtype))
              for layer in layers}
    if task == "classification":
        columns = {"logits": datasets.List(datasets.Value(values_dtype))}
    elif top_k is None:
        columns = {"logits": rows, "positions": datasets.List(datasets.Value("int32"))}
    else:
        columns = {"topk_values": rows,
                   "topk_indices": datasets.List(datasets.List(datasets.Value(index_dtype(width)))),
                   "tail": datasets.List(datasets.Value("float32")),
                   "positions": datasets.List(datasets.Value("int32"))}
    return datasets.Features({**columns, **hidden, "fingerprint": datasets.Value("string")})


# ---- the cache ------------------------------------------------------------------------------------------------
def cache_teacher_outputs(
    teacher: nn.Module,
    dataset: datasets.Dataset,
    output_dir: str | Path,
    *,
    top_k: int | None = 64,
    values_dtype: ValuesDtype = "float16",
    batch_size: int = 16,
    data_collator: Callable[[list[dict]], dict] | None = None,
    fingerprint_columns: Sequence[str] | None = None,
    tokenizer: Any = None,
    hidden_states: Sequence[int] | None = None,
    hidden_pooling: HiddenPooling = "tokens",
    shard_batches: int = 16,
) -> datasets.Dataset:
    """Run the frozen ``teacher`` once over ``dataset`` (in order, ``batch_size`` rows per batch through
    ``data_collator``, default ``transformers.default_data_collator`` for equal-length rows) and save its outputs
    to ``output_dir`` in the format of this module's docstring; returns the cache as a ``datasets.Dataset``.

    ``top_k`` (causal LMs): the logits kept per position, ``None`` for all. ``hidden_states``: the hidden layers
    to keep too (indices of the teacher's ``hidden_states`` tuple, e.g. ``[-1]``), per token or pooled
    (``hidden_pooling``, module docstring), for the representation and relation distillers that read them.
    ``fingerprint_columns``: the columns
    each row's fingerprint covers, by default every column ``teacher.forward`` accepts plus ``labels``. A complete
    cache at ``output_dir`` with the same metadata is loaded without running the teacher; one with other metadata
    is refused. An interrupted build restarted with the same arguments continues after its last complete shard.
    Run it in one process (the teacher on its own device); training runs then read the folder from every process.
    """
    check_choice("cache_teacher_outputs", "values_dtype", values_dtype, ValuesDtype)
    check_choice("cache_teacher_outputs", "hidden_pooling", hidden_pooling, HiddenPooling)
    task = task_of(teacher)
    layers = _hidden_layers(teacher, hidden_states)
    if task not in ("classification", "causal_lm"):
        raise ValueError(f"cache_teacher_outputs caches classifiers and causal LMs; {type(unwrap(teacher)).__name__} "
                         "is neither.")
    width = logits_width(teacher)
    if task == "causal_lm" and top_k is not None and not 1 <= top_k <= (width or top_k):
        raise ValueError(f"`top_k` must be between 1 and the vocabulary size {width} (or None for all), got {top_k}.")
    dataset = dataset.with_format(None)
    accepts = accepted_inputs(teacher)
    inputs = [c for c in dataset.column_names if accepts(c)] + (["labels"] if "labels" in dataset.column_names else [])
    columns = list(fingerprint_columns) if fingerprint_columns is not None else sorted(inputs)
    fingerprints = [row_fingerprint(row, columns) for row in dataset.select_columns(columns)]
    metadata = _metadata(teacher, dataset, task, width, None if task == "classification" else top_k, values_dtype,
                         columns, fingerprints, tokenizer)
    metadata.update(hidden_states=layers, hidden_pooling=hidden_pooling if layers else None)

    output_dir = Path(output_dir)
    staging = output_dir.parent / f"{output_dir.name}.building"
    if output_dir.exists():
        existing = _existing(output_dir, metadata)
        if existing is not None:
            shutil.rmtree(staging, ignore_errors=True)  # left when a build stopped between its rename and cleanup
            return existing
    building = {**metadata, "batch_size": batch_size, "shard_batches": shard_batches}
    if not (staging / _BUILDING).is_file() or json.loads((staging / _BUILDING).read_text()) != building:
        shutil.rmtree(staging, ignore_errors=True)  # none, or another build's
        staging.mkdir(parents=True)
        _write_json(staging / _BUILDING, building)

    rows_per_shard = batch_size * shard_batches
    num_shards = -(-len(dataset) // rows_per_shard)
    shards = [staging / f"shard-{s:05d}" for s in range(num_shards)]
    done = next((s for s, shard in enumerate(shards) if not shard.is_dir()), num_shards)
    features = _features(task, metadata["top_k"], values_dtype, width, layers, hidden_pooling)
    collate = data_collator or default_data_collator
    examples = dataset.select_columns(inputs)
    num_batches = -(-len(dataset) // batch_size)
    progress = tqdm(total=num_batches, initial=min(done * shard_batches, num_batches), desc="teacher cache")
    was_training = unwrap(teacher).training
    teacher.eval()
    try:
        for s in range(done, num_shards):
            start, stop = s * rows_per_shard, min((s + 1) * rows_per_shard, len(dataset))
            shard: dict[str, list] = {name: [] for name in features}
            for first in range(start, stop, batch_size):
                batch = collate([examples[i] for i in range(first, min(first + batch_size, stop))])
                for name, values in _run(teacher, batch, task, metadata["top_k"], np.dtype(values_dtype), layers,
                                         hidden_pooling).items():
                    shard[name].extend(values)
                progress.update()
            shard["fingerprint"] = fingerprints[start:stop]
            _save_shard(datasets.Dataset.from_dict(shard, features=features), shards[s])
    finally:
        progress.close()
        teacher.train(was_training)

    complete = staging / "cache"
    shutil.rmtree(complete, ignore_errors=True)
    parts = [datasets.load_from_disk(str(shard)) for shard in shards]
    cache = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict(
        {name: [] for name in features}, features=features)
    cache.save_to_disk(str(complete))
    _write_json(complete / METADATA, metadata)  # last: the folder is now complete
    if output_dir.exists():
        output_dir.rmdir()  # empty (checked by _existing)
    complete.rename(output_dir)
    shutil.rmtree(staging)
    return datasets.load_from_disk(str(output_dir))


def load_teacher_cache(path: str | Path) -> tuple[datasets.Dataset, dict[str, Any]]:
    """The cache at ``path`` and its metadata; refuses a folder without :data:`METADATA` (not a complete cache)."""
    path = Path(path)
    if not (path / METADATA).is_file():
        raise ValueError(f"{path} is not a complete teacher_cache (no {METADATA}); rebuild it with "
                         "hf_kd.cache.cache_teacher_outputs.")
    return datasets.load_from_disk(str(path)), json.loads((path / METADATA).read_text())


def _run(teacher: nn.Module, batch: dict[str, Any], task: str, top_k: int | None, dtype: np.dtype,
         layers: Sequence[int], pooling: str) -> dict[str, list[np.ndarray]]:
    """One batch through the teacher, as cache columns."""
    device = next(teacher.parameters()).device
    inputs = {k: v.to(device) for k, v in model_inputs(batch, teacher).items()}
    with torch.inference_mode():
        outputs = teacher(**inputs, **({"output_hidden_states": True} if layers else {}))
    columns = _batch_columns(outputs.logits.float().cpu(), batch, task, top_k, dtype)
    if layers:
        columns.update(_hidden_columns(outputs.hidden_states, batch, layers, pooling, dtype))
    return columns


def _hidden_layers(teacher: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as sorted non-negative indices of the teacher's ``hidden_states`` tuple (``num_layers + 1``
    entries), or an error naming the valid range."""
    if not layers:
        return []
    count = num_layers(teacher) + 1
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)
           or not -count <= layer < count]
    if bad:
        raise ValueError(f"`hidden_states` takes indices of the teacher's {count} hidden states (0: the embeddings, "
                         f"-1 or {count - 1}: the last layer); got {bad}.")
    return sorted({layer % count for layer in layers})


def _save_shard(shard: datasets.Dataset, path: Path) -> None:
    """``shard`` saved under a temporary name and renamed to ``path``: a shard folder is always complete."""
    partial = path.with_name(path.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    shard.save_to_disk(str(partial))
    partial.rename(path)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """``value`` written to ``path`` under a temporary name and renamed: the file is whole or absent."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(value, indent=2))
    partial.replace(path)


def _metadata(teacher: nn.Module, dataset: datasets.Dataset, task: str, width: int | None, top_k: int | None,
              values_dtype: str, columns: list[str], fingerprints: list[str], tokenizer: Any) -> dict[str, Any]:
    """What identifies a cache: format, teacher, outputs kept and dataset. The config hash leaves out
    ``transformers_version`` (a library upgrade does not change the teacher) and ``_name_or_path`` (stored as is)."""
    config = unwrap(teacher).config
    config_dict = {k: v for k, v in json.loads(config.to_json_string()).items()
                   if k not in ("transformers_version", "_name_or_path")}
    lengths = [len(ids) for ids in dataset["input_ids"]] if "input_ids" in dataset.column_names else []
    return {
        "format_version": FORMAT_VERSION,
        "teacher_class": type(unwrap(teacher)).__name__,
        "teacher_name_or_path": getattr(config, "_name_or_path", ""),
        "teacher_config": config_dict,
        "teacher_config_sha256": _sha256(config_dict),
        "task": task,
        "logits_width": width,
        "top_k": top_k,
        "values_dtype": values_dtype,
        "fingerprint_columns": columns,
        "num_rows": len(dataset),
        "dataset_fingerprint": _sha256(fingerprints),
        "max_length": max(lengths, default=None),
        "tokenizer_sha256": None if tokenizer is None else tokenizer_hash(tokenizer),
    }


def _existing(output_dir: Path, metadata: dict[str, Any]) -> datasets.Dataset | None:
    """The complete cache at ``output_dir`` when its metadata is ``metadata``; ``None`` when the folder is empty;
    a ``ValueError`` naming the differences, or for a non-empty folder that is not a cache."""
    if not (output_dir / METADATA).is_file():
        if any(output_dir.iterdir()):
            raise ValueError(f"{output_dir} exists and is not a teacher cache (no {METADATA}); pass another "
                             "`output_dir` or remove it.")
        return None
    cache, found = load_teacher_cache(output_dir)
    differ = {key: (found.get(key), value) for key, value in metadata.items() if found.get(key) != value}
    if differ:
        details = "; ".join(f"{key}: cached {old!r}, asked {new!r}" for key, (old, new) in differ.items())
        raise ValueError(f"{output_dir} holds a teacher cache built with other settings ({details}); pass another "
                         "`output_dir` or delete it to rebuild.")
    return cache

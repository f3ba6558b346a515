"""Distil a small ViT teacher into a 10x smaller ViT student on scikit-learn's 8x8 digits, on CPU in about a minute.

1. Split the 1,797 digits of ``sklearn.datasets.load_digits()`` into 1,437 train / 360 test images (stratified,
   fixed split) and turn them into ``pixel_values`` with a ``ViTImageProcessor``.
2. Train the teacher (a 4-layer ViT, ~136k parameters) with plain ``transformers.Trainer``.
3. Train the student (a 1-layer ViT, ~9.7k parameters) twice from the same initialisation and with the same
   hyperparameters: with plain ``Trainer`` (cross-entropy only), and with ``hf_kd.DistillationTrainer``
   (cross-entropy + KL to the teacher's softened logits).
4. Print parameters and test accuracy of the three models, save the distilled student with its image processor
   and check that ``AutoModelForImageClassification.from_pretrained`` reloads it with identical logits.

Run it with::

    python recipes/vit_digits.py                      # defaults; --help lists the options
    python recipes/vit_digits.py --max_steps 5        # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_kd import DistillationArguments, DistillationTrainer

TEACHER = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)
STUDENT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
BATCH_SIZE = 32
LEARNING_RATE = 2e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs/vit_digits", help="Where the distilled student is saved.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the models' initialisation and data order.")
    parser.add_argument("--teacher_epochs", type=float, default=40, help="Epochs of teacher training.")
    parser.add_argument("--student_epochs", type=float, default=40, help="Epochs of each student run.")
    parser.add_argument("--temperature", type=float, default=2.0, help="Softmax temperature of the KL distiller.")
    parser.add_argument("--hard_label_weight", type=float, default=1.0, help="Weight of the student's own CE.")
    parser.add_argument("--max_steps", type=int, default=None, help="At most this many steps per training phase.")
    return parser.parse_args(argv)


def digits_datasets(processor) -> tuple[list[dict], list[dict]]:
    """The stratified 1,437 / 360 train / test split: lists of ``{"pixel_values": [1, 8, 8] tensor, "labels": int}``."""
    digits = load_digits()
    images = digits.images[:, None].astype(np.float32)  # [N, 1, 8, 8], values 0..16
    splits = train_test_split(images, digits.target, test_size=360, stratify=digits.target, random_state=0)
    train_images, test_images, train_labels, test_labels = splits

    def to_examples(images, labels):
        pixels = processor(list(images), input_data_format="channels_first", return_tensors="pt")["pixel_values"]
        return [{"pixel_values": x, "labels": int(y)} for x, y in zip(pixels, labels)]

    return to_examples(train_images, train_labels), to_examples(test_images, test_labels)


def vit(sizes: dict, seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    labels = {i: str(i) for i in range(10)}
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, num_labels=10, id2label=labels,
                       label2id={v: k for k, v in labels.items()}, **sizes)
    return ViTForImageClassification(config)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def accuracy(eval_prediction) -> dict[str, float]:
    return {"accuracy": float((eval_prediction.predictions.argmax(-1) == eval_prediction.label_ids).mean())}


def training_args(cls, cli: argparse.Namespace, epochs: float, train_size: int, **extra) -> TrainingArguments:
    """The hyperparameters shared by every phase; ``--max_steps`` caps the number of optimizer steps."""
    steps = math.ceil(epochs * math.ceil(train_size / BATCH_SIZE))
    if cli.max_steps is not None:
        steps = min(steps, cli.max_steps)
    return cls(
        output_dir=cli.output_dir,
        max_steps=steps,
        per_device_train_batch_size=BATCH_SIZE,
        per_device_eval_batch_size=256,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.01,
        logging_steps=100,
        save_strategy="no",
        report_to=[],
        seed=cli.seed,
        **extra,
    )


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    start = time.perf_counter()
    # The PIL backend of ViTImageProcessor (the default backend needs torchvision); digits are 0..16, no resizing.
    processor = ViTImageProcessorPil(
        do_resize=False, size={"height": 8, "width": 8}, rescale_factor=1 / 16, image_mean=[0.5], image_std=[0.5]
    )
    train, test = digits_datasets(processor)
    common = dict(train_dataset=train, eval_dataset=test, processing_class=processor, compute_metrics=accuracy)
    teacher, student = vit(TEACHER, cli.seed), vit(STUDENT, cli.seed)
    results = {"teacher_params": count_params(teacher), "student_params": count_params(student)}
    results["compression"] = results["teacher_params"] / results["student_params"]
    assert results["compression"] >= 10, f"the student should be >= 10x smaller, got {results['compression']:.1f}x"

    def run(name: str, trainer: Trainer) -> None:
        results[f"{name}_train_seconds"] = trainer.train().metrics["train_runtime"]
        results[f"{name}_accuracy"] = trainer.evaluate()["eval_accuracy"]

    run("teacher", Trainer(teacher, training_args(TrainingArguments, cli, cli.teacher_epochs, len(train)), **common))
    run("student_ce", Trainer(student, training_args(TrainingArguments, cli, cli.student_epochs, len(train)), **common))
    # Built once the teacher is trained: DistillationTrainer freezes its teacher.
    distilled = DistillationTrainer(
        model=vit(STUDENT, cli.seed),  # the same initialisation as the baseline
        teacher_model=teacher,
        args=training_args(DistillationArguments, cli, cli.student_epochs, len(train),
                           hard_label_weight=cli.hard_label_weight),
        distillers=[{"name": "kl", "temperature": cli.temperature}],
        **common,
    )
    run("student_kd", distilled)

    distilled.save_model(cli.output_dir)
    results["student_path"] = cli.output_dir
    results["reload_max_abs_diff"] = check_reload(distilled.model, cli.output_dir)
    results["wall_seconds"] = time.perf_counter() - start
    print_table(results)
    return results


def check_reload(student: torch.nn.Module, path: str) -> float:
    """Reload the saved student and processor from ``path``; their logits on raw digits must equal ``student``'s."""
    images = list(load_digits().images[:, None].astype(np.float32))
    processor = AutoImageProcessor.from_pretrained(path)
    reloaded = AutoModelForImageClassification.from_pretrained(path).eval()
    inputs = processor(images, input_data_format="channels_first", return_tensors="pt")
    student.eval()
    with torch.no_grad():
        expected = student(**inputs).logits
        actual = reloaded(**inputs).logits
    if not torch.equal(expected, actual):
        raise AssertionError(f"reloaded student differs: max |diff| = {(expected - actual).abs().max():.3g}")
    return float((expected - actual).abs().max())


def print_table(results: dict) -> None:
    print(f"\n{'model':<16}{'params':>9}{'test acc':>10}{'train time':>12}")
    rows = [("teacher", "teacher", "teacher_params"), ("student, no KD", "student_ce", "student_params"),
            ("student, KD", "student_kd", "student_params")]
    for name, key, params in rows:
        acc, seconds = results[f"{key}_accuracy"], results[f"{key}_train_seconds"]
        print(f"{name:<16}{results[params]:>9,}{acc:>10.1%}{seconds:>10.0f} s")
    gain = 100 * (results["student_kd_accuracy"] - results["student_ce_accuracy"])
    print(f"The student has {results['compression']:.1f}x fewer parameters; distillation changes its accuracy by "
          f"{gain:+.1f} points.\nSaved to {results['student_path']}, reloads with identical logits. "
          f"Wall time {results['wall_seconds']:.0f} s.")


if __name__ == "__main__":
    # The models are tiny: a second thread barely helps, and stalls every step when another process shares the CPU.
    torch.set_num_threads(1)
    main()

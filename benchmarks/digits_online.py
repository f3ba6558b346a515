"""Online distillers (ATSC, SOKD) vs plain KD on the scikit-learn digits demo of ``recipes/vit_digits.py`` (issue 4).

Per seed: the demo's ViT teacher is trained once (demo settings), then the demo's student (same initialisation for
every method) is trained with the demo's student hyperparameters and

- ``ce``:   plain ``Trainer`` (cross-entropy only; the demo's baseline);
- ``kl``:   ``DistillationTrainer`` with ``kl`` (T=2, ``hard_label_weight=1``; the demo's KD run);
- ``atsc``: ``atsc`` (student predicts through the teacher's classifier), ``teacher_adaptation`` from
            ``--atsc_adaptation`` (``full`` trains a private copy of the teacher at ``--teacher_learning_rate``);
            the reported accuracy is the plain (folded) student's, evaluated outside the trainer;
- ``sokd``: ``sokd`` (k=``--sokd_k``, T=4); also reports the auxiliary branch's test accuracy.

Every distillation run gets its own deep copy of the trained teacher, so ATSC's adaptation cannot leak into the
other runs. Test accuracy is on the demo's fixed 360-image test split. Run::

    python benchmarks/digits_online.py --seeds 0 1 2
    python benchmarks/digits_online.py --seeds 0 --max_steps 5      # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, ViTImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from vit_digits import (  # noqa: E402
    STUDENT,
    TEACHER,
    accuracy,
    digits_datasets,
    training_args,
    vit,
)

from hf_kd import DistillationArguments, DistillationTrainer  # noqa: E402

METHODS = ("ce", "kl", "atsc", "sokd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher_epochs", type=float, default=40, help="Demo default 40.")
    parser.add_argument("--student_epochs", type=float, default=40, help="Demo default 40.")
    parser.add_argument("--max_steps", type=int, default=None, help="At most this many steps per phase.")
    parser.add_argument("--atsc_adaptation", choices=["full", "none"], default="full")
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-4, help="ATSC 'full' teacher LR.")
    parser.add_argument("--sokd_k", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Student runs to do.")
    parser.add_argument("--output_dir", default="outputs/digits_online")
    parser.add_argument("--json", default=None, help="Also write the per-seed results to this JSON file.")
    return parser.parse_args(argv)


@torch.no_grad()
def plain_accuracy(model: torch.nn.Module, examples: list[dict]) -> float:
    """Accuracy of ``model`` called directly (no trainer, no distiller hooks) on ``examples``."""
    model.eval()
    pixels = torch.stack([e["pixel_values"] for e in examples])
    labels = torch.tensor([e["labels"] for e in examples])
    return float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())


def run_seed(cli: argparse.Namespace, seed: int, train: list, test: list, processor) -> dict:
    args = argparse.Namespace(output_dir=cli.output_dir, seed=seed, max_steps=cli.max_steps)
    common = dict(train_dataset=train, eval_dataset=test, processing_class=processor, compute_metrics=accuracy)
    out: dict = {"seed": seed}

    def timed(name: str, trainer: Trainer) -> Trainer:
        out[f"{name}_train_seconds"] = trainer.train().metrics["train_runtime"]
        return trainer

    teacher = vit(TEACHER, seed)
    timed("teacher", Trainer(teacher, training_args(TrainingArguments, args, cli.teacher_epochs, len(train)), **common))
    out["teacher"] = plain_accuracy(teacher, test)
    student_args = lambda cls, **kw: training_args(cls, args, cli.student_epochs, len(train), **kw)  # noqa: E731
    out["student_steps"] = student_args(TrainingArguments).max_steps

    if "ce" in cli.methods:
        student = vit(STUDENT, seed)
        timed("ce", Trainer(student, student_args(TrainingArguments), **common))
        out["ce"] = plain_accuracy(student, test)

    def distil(name: str, distiller: dict, **extra) -> DistillationTrainer:
        student = vit(STUDENT, seed)  # the demo's student initialisation, identical for every method
        trainer = DistillationTrainer(model=student, teacher_model=copy.deepcopy(teacher),
                                      args=student_args(DistillationArguments, hard_label_weight=1.0, **extra),
                                      distillers=[distiller], **common)
        timed(name, trainer)
        out[name] = plain_accuracy(trainer.model, test)
        return trainer

    if "kl" in cli.methods:
        distil("kl", {"name": "kl", "temperature": 2.0})
    if "atsc" in cli.methods:
        atsc_run(cli, distil, out, test)
    if "sokd" in cli.methods:
        sokd = distil("sokd", {"name": "sokd", "k": cli.sokd_k, "temperature": 4.0})
        metrics = sokd.evaluate()
        out["sokd_branch"] = metrics.get("eval_loss/sokd/branch_accuracy",
                                         next((v for k, v in metrics.items() if k.endswith("branch_accuracy")), None))
    return out


def atsc_run(cli, distil, out: dict, test: list) -> None:
    atsc = distil("atsc", {"name": "atsc", "teacher_adaptation": cli.atsc_adaptation},
                  teacher_learning_rate=cli.teacher_learning_rate if cli.atsc_adaptation == "full" else None)
    # The trainer's own eval (shared-classifier hook on) must agree with the folded plain student.
    out["atsc_trainer_eval"] = atsc.evaluate()["eval_accuracy"]
    out["atsc_adapted_teacher"] = plain_accuracy(atsc.teacher, test)


COLUMNS = [("teacher", "teacher"), ("ce", "student CE"), ("kl", "KD kl"), ("atsc", "ATSC"), ("sokd", "SOKD"),
           ("sokd_branch", "SOKD branch"), ("atsc_adapted_teacher", "ATSC teacher*")]


def print_table(rows: list[dict]) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]
    lines = ["| seed | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    fmt = lambda v: "—" if v is None else f"{100 * v:.1f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    means = {k: sum(r[k] for r in rows) / len(rows) for k, _ in cols if all(r.get(k) is not None for r in rows)}
    lines.append("| **mean** | " + " | ".join(f"**{fmt(means.get(k))}**" for k, _ in cols) + " |")
    table = "\n".join(lines)
    print("\nTest accuracy (%), 360 held-out digits:\n" + table)
    return table


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parse_args(argv)
    start = time.perf_counter()
    processor = ViTImageProcessorPil(
        do_resize=False, size={"height": 8, "width": 8}, rescale_factor=1 / 16, image_mean=[0.5], image_std=[0.5]
    )
    train, test = digits_datasets(processor)
    rows = []
    for seed in cli.seeds:
        rows.append(run_seed(cli, seed, train, test, processor))
        print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    wall = time.perf_counter() - start
    print(f"Methods {' '.join(cli.methods)}. ATSC: teacher_adaptation={cli.atsc_adaptation}"
          + (f", teacher_learning_rate={cli.teacher_learning_rate}" if cli.atsc_adaptation == "full" else "")
          + f"; SOKD: k={cli.sokd_k}, T=4; student steps {rows[0]['student_steps']}. Wall time {wall:.0f} s.")
    if cli.json:
        Path(cli.json).write_text(json.dumps({"args": vars(cli), "rows": rows, "wall_seconds": wall}, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the demo: tiny models, shared CPU
    main()

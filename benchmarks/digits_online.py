"""Online distillers (ATSC, SOKD) vs plain KD on the scikit-learn digits default of
``recipes/vit_image_classification.py`` (issue 4).

Per seed: the recipe's ViT teacher is trained once (recipe defaults), then the recipe's student (same initialisation
for every method) is trained with the recipe's hyperparameters and

- ``ce``:   plain ``Trainer`` (cross-entropy only; the recipe's baseline);
- ``kl``:   ``DistillationTrainer`` with ``kl`` (T=2, ``hard_label_weight=1``; the recipe's default KD run);
- ``atsc``: ``atsc`` (student predicts through the teacher's classifier), ``teacher_adaptation`` from
            ``--atsc_adaptation`` (``full`` trains a private copy of the teacher at ``--teacher_learning_rate``);
            the reported accuracy is the plain (folded) student's, evaluated outside the trainer;
- ``sokd``: ``sokd`` (k=``--sokd_k``, T=4); also reports the auxiliary branch's test accuracy.

Every distillation run gets its own deep copy of the trained teacher, so ATSC's adaptation cannot leak into the
other runs. Test accuracy is on the recipe's fixed 360-image digits test split. Run::

    python benchmarks/digits_online.py --seeds 0 1 2
    python benchmarks/digits_online.py --seeds 0 --max_steps 5      # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from vit_image_classification import RECIPE, build_model, digits_splits, preprocess, resolve_setting  # noqa: E402

from hf_kd import DistillationArguments, DistillationTrainer  # noqa: E402
from hf_kd.recipes import classification_metrics, phase_arguments  # noqa: E402

METHODS = ("ce", "kl", "atsc", "sokd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--teacher_epochs", type=float, default=40, help="Recipe default 40.")
    parser.add_argument("--student_epochs", type=float, default=40, help="Recipe default 40.")
    parser.add_argument("--max_steps", type=int, default=None, help="At most this many steps per phase.")
    parser.add_argument("--atsc_adaptation", choices=["full", "none"], default="full")
    parser.add_argument("--teacher_learning_rate", type=float, default=1e-4, help="ATSC 'full' teacher LR.")
    parser.add_argument("--sokd_k", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="Student runs to do.")
    parser.add_argument("--output_dir", default="outputs/digits_online")
    parser.add_argument("--json", default=None, help="Also write the per-seed results to this JSON file.")
    return parser.parse_args(argv)


def plain_accuracy(model: torch.nn.Module, examples) -> float:
    """Accuracy of ``model`` called directly (no trainer, no distiller hooks) on ``examples``."""
    model.eval()
    batch = examples[:]
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"]).logits
    return float((logits.argmax(-1) == batch["labels"]).float().mean())


def training_args(cli: argparse.Namespace, seed: int, epochs: float, train_size: int,
                  **extra) -> DistillationArguments:
    """The recipe's default hyperparameters (no periodic eval) for one phase of ``epochs`` (at most ``--max_steps``
    steps). Plain ``Trainer`` takes them too (``DistillationArguments`` extends ``TrainingArguments``)."""
    steps = math.ceil(epochs * math.ceil(train_size / RECIPE.defaults["per_device_train_batch_size"]))
    _, defaults = RECIPE.parse_dict({"output_dir": cli.output_dir, "seed": seed, "eval_strategy": "no",
                                     "max_steps": min(steps, cli.max_steps or steps), **extra})
    return phase_arguments(defaults, output_dir=cli.output_dir, epochs=epochs, train_size=train_size)


def run_seed(cli: argparse.Namespace, seed: int, train, test, spec, setting) -> dict:
    common = dict(train_dataset=train, eval_dataset=test, processing_class=setting.processor,
                  compute_metrics=classification_metrics)
    out: dict = {"seed": seed}

    def timed(name: str, trainer: Trainer) -> Trainer:
        out[f"{name}_train_seconds"] = trainer.train().metrics["train_runtime"]
        return trainer

    teacher = build_model(spec, setting, "teacher", seed)
    timed("teacher", Trainer(teacher, training_args(cli, seed, cli.teacher_epochs, len(train)),
                             **common))
    out["teacher"] = plain_accuracy(teacher, test)
    student_args = lambda **kw: training_args(cli, seed, cli.student_epochs, len(train), **kw)  # noqa: E731
    out["student_steps"] = student_args().max_steps

    if "ce" in cli.methods:
        student = build_model(spec, setting, "student", seed)
        timed("ce", Trainer(student, student_args(), **common))
        out["ce"] = plain_accuracy(student, test)

    def distil(name: str, distiller: dict, **extra) -> DistillationTrainer:
        student = build_model(spec, setting, "student", seed)  # the recipe's initialisation, identical for every method
        trainer = DistillationTrainer(model=student, teacher_model=copy.deepcopy(teacher),
                                      args=student_args(hard_label_weight=1.0, distillers=[distiller], **extra),
                                      **common)
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
    spec, _ = RECIPE.parse_dict({})
    raw_train, raw_test = digits_splits()
    setting = resolve_setting(spec, raw_train)
    train, test = (preprocess(data, setting, spec, split) for data, split in ((raw_train, "train"), (raw_test, "test")))
    rows = []
    for seed in cli.seeds:
        rows.append(run_seed(cli, seed, train, test, spec, setting))
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
    torch.set_num_threads(1)  # as the recipe: tiny models, shared CPU
    main()

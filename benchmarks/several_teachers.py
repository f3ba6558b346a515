"""Several teachers, teacher assistants and teacher-free KD on the ViT digits recipe: accuracy (mean over seeds)
against single-teacher ``kl`` and against no KD.

Per seed, every run uses the recipe's defaults (a 4x64 ViT teacher trained by the recipe, a 1x32 student, 40 epochs):

- ``kl``: single-teacher KD (T=2, plus cross-entropy), with the recipe's baseline (cross-entropy only, "no KD").
- ``mean`` / ``confidence``: ``kl`` (T=2) with ``teacher_aggregation`` over two teachers of the same architecture
  trained with different seeds (the second one is the recipe's teacher of seed ``seed + 100``).
- ``dgkd`` / ``ces_kd``: the teacher and one assistant (a 2x48 ViT distilled from the teacher by the recipe with
  ``kl``, TAKD's first stage), each method at its own defaults (T=5 / T=4).
- ``kl rectify (DR-KD self)``: the teacher is the seed's baseline student (the student's own architecture trained
  with cross-entropy), ``kl`` T=2 with ``rectify=True``.
- ``virtual_teacher``: Tf-KD's hand-made target (correct-class probability 0.9), no teacher read.

The helper runs that train the second teacher and the assistant are not rows of the table; their accuracies are
kept in the JSON (``helpers``). Run::

    python benchmarks/several_teachers.py --seeds 0 1 2 --json benchmarks/results/several_teachers.json
    python benchmarks/several_teachers.py --seeds 0 --max_steps 5          # smoke test
    python benchmarks/several_teachers.py --from_json a.json b.json        # one table of saved runs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_rows import RECIPES, run_row, table  # noqa: E402

KL = {"name": "kl", "temperature": 2.0}
ASSISTANT = {"student_layers": 2, "student_hidden": 48, "student_heads": 4, "student_intermediate": 96}
SECOND_TEACHER_SEED = 100  # the second teacher is the recipe's teacher of seed + this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=-1, help="At most this many steps per phase (-1: the "
                        "recipe's).")
    parser.add_argument("--output_dir", default="outputs/several_teachers")
    parser.add_argument("--json", default=None, help="Also write every run's figures to this JSON file.")
    parser.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                        help="Run nothing: print the table of the runs saved in these --json files together.")
    return parser.parse_args(argv)


def seed_rows(cli: argparse.Namespace, seed: int) -> tuple[list[dict], dict]:
    """The table's rows of one seed, and the helper models' figures."""
    def run(label: str, settings: dict, baseline: bool = False, run_seed: int = seed) -> tuple[dict, dict]:
        row, out = run_row("vit", label, run_seed, {"max_steps": cli.max_steps, **settings}, cli.output_dir,
                           baseline)
        print(json.dumps(row), flush=True)
        return row, out

    kl, out = run("kl", {"distillers": [KL]}, baseline=True)
    teacher, self_teacher = out["teacher_path"], str(Path(out["output_dir"]) / "baseline")
    # The helpers: a second teacher (the students of this run are not used: one epoch), and the assistant.
    _, second = run("second-teacher", {"distillers": [KL], "num_train_epochs": 1},
                    run_seed=seed + SECOND_TEACHER_SEED)
    _, assistant = run("assistant", {"distillers": [KL], **ASSISTANT})
    helpers = {"seed": seed, "teacher_accuracy": out["results"]["teacher"].metrics["accuracy"],
               "second_teacher_accuracy": second["results"]["teacher"].metrics["accuracy"],
               "assistant_accuracy": assistant["results"]["student"].metrics["accuracy"],
               "assistant_params": assistant["results"]["student"].params}
    two_teachers = {"teacher": teacher, "assistants": [second["teacher_path"]]}
    with_assistant = {"teacher": teacher, "assistants": [assistant["student_path"]]}
    runs = [
        ("kl mean (2 teachers)", {**two_teachers, "distillers": [{**KL, "teacher_aggregation": "mean"}]}),
        ("kl confidence (2 teachers)", {**two_teachers, "distillers": [{**KL, "teacher_aggregation": "confidence"}]}),
        ("dgkd (teacher + assistant)", {**with_assistant, "distillers": [{"name": "dgkd"}]}),
        ("ces_kd (teacher + assistant)", {**with_assistant, "distillers": [{"name": "ces_kd"}]}),
        ("kl rectify (DR-KD self)", {"teacher": self_teacher, "distillers": [{**KL, "rectify": True}]}),
        ("virtual_teacher", {"distillers": [{"name": "virtual_teacher"}]}),
    ]
    return [kl, *(run(label, settings)[0] for label, settings in runs)], helpers


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parse_args(argv)
    if cli.from_json:
        saved = [json.loads(Path(path).read_text()) for path in cli.from_json]
        rows, helpers = [r for s in saved for r in s["rows"]], [h for s in saved for h in s["helpers"]]
    else:
        start, rows, helpers = time.perf_counter(), [], []
        for seed in cli.seeds:
            seed_table, seed_helpers = seed_rows(cli, seed)
            rows.extend(seed_table)
            helpers.append(seed_helpers)
        print(f"Wall time {time.perf_counter() - start:.0f} s.")
        if cli.json:
            Path(cli.json).write_text(json.dumps({"args": vars(cli), "rows": rows, "helpers": helpers}, indent=1))
    print(f"\n{RECIPES['vit'][1]}:\n" + table(rows))
    for h in sorted(helpers, key=lambda h: h["seed"]):
        print(f"seed {h['seed']}: teacher {100 * h['teacher_accuracy']:.1f}, second teacher "
              f"{100 * h['second_teacher_accuracy']:.1f}, assistant ({h['assistant_params']:,} params) "
              f"{100 * h['assistant_accuracy']:.1f}")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the recipe: tiny models, shared CPU
    main()

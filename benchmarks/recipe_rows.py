"""What the recipe benchmarks share: one recipe run as a row of figures, and the table of rows over seeds.

A row is ``{"seed", "distillers" (the row's label), "accuracy", "step_ms"}``, plus ``"no_kd_accuracy"`` for a run
that also trained the recipe's baseline (cross-entropy only, same seed and steps). Step time is the distillation
phase's train seconds per optimizer step.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import text_classification  # noqa: E402
import vit_image_classification  # noqa: E402

RECIPES = {"vit": (vit_image_classification.RECIPE, "ViT digits, test accuracy (%) on the 360 held-out images"),
           "text": (text_classification.RECIPE, "BBC News, test accuracy (%) on the 425 held-out articles")}


def run_row(recipe: str, label: str, seed: int, settings: Mapping[str, Any], output_dir: str,
            baseline: bool = False) -> tuple[dict, dict]:
    """Run ``recipe`` (a key of :data:`RECIPES`) once with ``settings`` over its defaults, without periodic
    evaluation, in ``output_dir/<label>-seed<seed>``: the row, and the recipe's output (paths of its models)."""
    recipe_ = RECIPES[recipe][0]
    args, training_args = recipe_.parse_dict({
        "logging_steps": 100, **settings, "seed": seed, "baseline": baseline, "eval_strategy": "no",
        "output_dir": f"{output_dir}/{label}-seed{seed}",
    })
    out = recipe_.run(args, training_args)
    student = out["results"]["student"]
    steps = max(log.get("step", 0) for log in out["histories"]["distillation"])
    row = {"seed": seed, "distillers": label, "accuracy": student.metrics["accuracy"],
           "step_ms": 1000 * student.train_seconds / steps}
    if baseline:
        row["no_kd_accuracy"] = out["results"]["baseline"].metrics["accuracy"]
    return row, out


def table(rows: list[dict], reference: str = "kl") -> str:
    """Accuracy and step time per label against the ``reference`` label's rows (which carry the no-KD accuracy); a
    seed run more than once (e.g. ``kl`` in several invocations) counts once, with the mean of its runs."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for row in sorted(rows, key=lambda r: r["distillers"] != reference):
        runs.setdefault(row["distillers"], {}).setdefault(row["seed"], []).append(row)

    def per_seed(name: str, key: str) -> list[float]:
        return [statistics.mean(r[key] for r in seed_rows) for _, seed_rows in sorted(runs[name].items())]

    ref_ms, ref_acc = statistics.mean(per_seed(reference, "step_ms")), statistics.mean(per_seed(reference, "accuracy"))
    no_kd = per_seed(reference, "no_kd_accuracy")
    lines = [f"| distillers | accuracy (mean) | per seed | vs {reference} | vs no KD | step time vs {reference} |",
             "|---|---|---|---|---|---|",
             f"| none (CE only) | {100 * statistics.mean(no_kd):.1f} | "
             + ", ".join(f"{100 * a:.1f}" for a in no_kd) + " | | | |"]
    for name in runs:
        accuracy = per_seed(name, "accuracy")
        acc, ms = statistics.mean(accuracy), statistics.mean(per_seed(name, "step_ms"))
        lines.append(f"| {name} | {100 * acc:.1f} | " + ", ".join(f"{100 * a:.1f}" for a in accuracy)
                     + f" | {100 * (acc - ref_acc):+.1f} | {100 * (acc - statistics.mean(no_kd)):+.1f} | "
                     f"{ms / ref_ms:.2f}x |")
    return "\n".join(lines)

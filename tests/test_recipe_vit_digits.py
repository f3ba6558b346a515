"""Smoke test of recipes/vit_digits.py: every phase runs a few steps, the distilled student is saved and reloads."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "vit_digits.py"


def test_vit_digits_recipe_smoke(tmp_path):
    recipe = runpy.run_path(str(RECIPE))
    results = recipe["main"](["--max_steps", "3", "--output_dir", str(tmp_path)])

    assert set(results) >= {
        "teacher_params", "student_params", "compression", "teacher_accuracy", "student_ce_accuracy",
        "student_kd_accuracy", "student_path", "reload_max_abs_diff", "wall_seconds",
    }
    assert results["teacher_params"] >= 10 * results["student_params"]
    for name in ("teacher_accuracy", "student_ce_accuracy", "student_kd_accuracy"):
        assert 0.0 <= results[name] <= 1.0
    assert results["reload_max_abs_diff"] == 0.0

    # The saved student and processor alone reproduce the accuracy reported for the distilled student.
    processor = AutoImageProcessor.from_pretrained(results["student_path"])
    student = AutoModelForImageClassification.from_pretrained(results["student_path"]).eval()
    assert sum(p.numel() for p in student.parameters()) == results["student_params"]
    _, test = recipe["digits_datasets"](processor)
    with torch.no_grad():
        predictions = student(pixel_values=test["pixel_values"]).logits.argmax(-1)
    assert (predictions == test["labels"]).float().mean().item() == results["student_kd_accuracy"]

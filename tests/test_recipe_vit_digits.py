"""Smoke test of recipes/vit_digits.py: every phase runs a few steps, the distilled student is saved and reloads."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "vit_digits.py"


@pytest.fixture
def one_thread():
    """Run like the recipe's command line does: one torch thread (see the end of recipes/vit_digits.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_vit_digits_recipe_smoke(tmp_path, one_thread):
    recipe = runpy.run_path(str(RECIPE))
    results = recipe["main"](["--max_steps", "3", "--output_dir", str(tmp_path)])

    assert set(results) >= {
        "teacher_params", "student_params", "compression", "teacher_accuracy", "student_ce_accuracy",
        "student_kd_accuracy", "teacher_train_seconds", "student_ce_train_seconds", "student_kd_train_seconds",
        "student_path", "reload_max_abs_diff", "wall_seconds",
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
    pixel_values = torch.stack([example["pixel_values"] for example in test])
    labels = torch.tensor([example["labels"] for example in test])
    with torch.no_grad():
        predictions = student(pixel_values=pixel_values).logits.argmax(-1)
    assert (predictions == labels).sum().item() == round(results["student_kd_accuracy"] * len(test))

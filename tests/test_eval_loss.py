"""``eval_loss`` is what a plain ``Trainer`` reports for the student (its own task loss), so ``exp(eval_loss)`` is its
perplexity and best-checkpoint selection compares students; the optimised objective is ``eval_distillation_loss``."""

from __future__ import annotations

import copy
import math

import pytest
from transformers import Trainer, TrainingArguments

from conftest import bert, llama, lm_data, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=3, seed=0)


@pytest.mark.parametrize("family, hard_label_weight", [("classifier", 0.5), ("causal_lm", 1.0), ("causal_lm", 0.0)])
def test_eval_loss_is_the_plain_trainers_and_the_objective_is_reported_beside_it(tmp_path, family,
                                                                                  hard_label_weight):
    if family == "classifier":
        student, teacher, data = bert(seed=1), bert(layers=3, seed=2), text_classification_data(n=8)
    else:
        student, teacher, data = llama(seed=1), llama(layers=3, seed=2), lm_data(n=8)
    plain = Trainer(model=copy.deepcopy(student), args=TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON))
    expected = plain.evaluate(data)["eval_loss"]
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, eval_dataset=data,
        args=DistillationArguments(output_dir=str(tmp_path / "kd"), hard_label_weight=hard_label_weight, **COMMON),
        distillers=[{"name": "kl", "temperature": 2.0, "weight": 0.7}],
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval_loss/hard"] == pytest.approx(expected, rel=1e-5)
    objective = hard_label_weight * metrics["eval_loss/hard"] + 0.7 * metrics["eval_loss/kl"]
    assert metrics["eval_distillation_loss"] == pytest.approx(objective, rel=1e-5)
    if family == "causal_lm":
        assert math.exp(metrics["eval_loss"]) == pytest.approx(math.exp(expected), rel=1e-5)  # the perplexity


def test_student_only_evaluation_and_predict_never_run_the_teacher(tmp_path):
    from conftest import bert, text_classification_data

    calls = []
    teacher = bert(layers=3, seed=2)
    teacher.register_forward_pre_hook(lambda module, args: calls.append(1))
    data = text_classification_data(n=8)

    def build(**overrides):
        return DistillationTrainer(
            model=bert(seed=1), teacher_model=teacher, eval_dataset=data, distillers=[{"name": "kl"}],
            args=DistillationArguments(output_dir=str(tmp_path), **{**COMMON, **overrides}),
        )

    full = build().evaluate()
    calls.clear()
    light = build(eval_distillation_losses=False).evaluate()
    assert not calls, "eval_distillation_losses=False must not run the teacher"
    assert light["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    assert "eval_distillation_loss" in full and "eval_distillation_loss" not in light
    trainer = build()
    predictions = trainer.predict(data)
    assert not calls and predictions.metrics["test_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)


def test_teacher_metrics_are_measured_once_and_merged_into_every_evaluation(tmp_path):
    from conftest import bert, text_classification_data

    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=bert(layers=3, seed=2), eval_dataset=text_classification_data(n=8),
        distillers=[{"name": "kl"}],
        args=DistillationArguments(output_dir=str(tmp_path), teacher_eval_metrics=True, **COMMON),
    )
    calls = []
    original = trainer.evaluate_teacher
    trainer.evaluate_teacher = lambda *a, **k: calls.append(1) or original(*a, **k)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert len(calls) == 1
    assert first["eval_teacher_loss"] == second["eval_teacher_loss"]

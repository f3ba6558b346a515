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

"""The flow of transformers' ``examples/pytorch`` scripts (run_clm.py, run_classification.py), edited the way README's
"Use it in your existing script" says: HfArgumentParser over DistillationArguments, a teacher, DistillationTrainer.
Their own derived metrics stay right: ``perplexity = exp(eval_loss)`` is the student's perplexity."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from transformers import HfArgumentParser, Trainer, TrainingArguments

from conftest import bert, llama, lm_data, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class ModelArguments:  # what the scripts parse beside their training arguments
    model_name_or_path: str = field(default="tiny")


def parse(tmp_path, *flags):
    parser = HfArgumentParser((ModelArguments, DistillationArguments))
    return parser.parse_args_into_dataclasses(args=["--output_dir", str(tmp_path), "--report_to", "none",
                                                    "--use_cpu", "--max_steps", "3", "--per_device_train_batch_size",
                                                    "4", "--disable_tqdm", "true", *flags])


def test_run_clm_flow_reports_the_students_perplexity(tmp_path):
    _, training_args = parse(tmp_path / "kd", "--distillers", '[{"name": "kl", "temperature": 2.0}]',
                             "--eval_strategy", "steps", "--eval_steps", "3")
    data = lm_data(n=12)
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=llama(layers=3, seed=2), args=training_args,
                                  train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    perplexity = math.exp(metrics["eval_loss"])  # what run_clm.py prints
    plain = Trainer(model=copy.deepcopy(trainer.model), args=TrainingArguments(
        output_dir=str(tmp_path / "plain"), report_to=[], use_cpu=True, per_device_eval_batch_size=8))
    assert perplexity == pytest.approx(math.exp(plain.evaluate(data)["eval_loss"]), rel=1e-5)
    assert metrics["eval_distillation_loss"] > metrics["eval_loss"]  # the objective adds the KL term


def test_run_classification_flow_with_its_compute_metrics_and_no_distillers_flag(tmp_path):
    _, training_args = parse(tmp_path)  # no --distillers: kl at T=2
    assert training_args.distillers == []

    def compute_metrics(prediction):  # the script's own metric code
        return {"accuracy": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

    data = text_classification_data(n=12)
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, seed=2), args=training_args,
                                  train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    assert [d.name for d in trainer.distillers] == ["kl"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_loss"])

"""The student's model card (hf_kd.model_card) and push_to_hub of the student only, offline: the Hub calls are
patched (create_repo, upload_folder), the upload's file list is what upload_folder's patterns select."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer
from hf_kd.distillers.atsc import SHARED_CLASSIFIER_CONFIG, SHARED_CLASSIFIER_WEIGHTS
from hf_kd.model_card import retention, split_metrics, write_card


def accuracy(prediction):
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def tokenizer():
    vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]", pad_token="[PAD]")


def classifier_trainer(output_dir, distillers, **overrides):
    student = bert(seed=1, hidden=16)
    student.config._name_or_path = "google/bert_uncased_L-2_H-128_A-2"  # as from_pretrained records it
    teacher = bert(layers=3, seed=2, hidden=32)
    args = training_args(output_dir, max_steps=2, logging_steps=1, teacher_eval_metrics=True, **overrides)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, distillers=distillers,
                               train_dataset=text_classification_data(),
                               eval_dataset=text_classification_data(8, seed=3),
                               compute_metrics=accuracy)


def front_matter(folder: Path) -> ModelCard:
    card = ModelCard.load(folder / "README.md")
    ModelCard(str(card))  # parses and checks the metadata again from the text
    return card


def test_bert_classifier_card(tmp_path):
    trainer = classifier_trainer(tmp_path, [{"name": "kl", "temperature": 2.0, "weight": 0.5}])
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_teacher_accuracy" in metrics
    trainer.save_model(str(tmp_path / "student"))  # the main process writes the card beside the student
    card = front_matter(tmp_path / "student")
    data = card.data
    assert data.base_model == "google/bert_uncased_L-2_H-128_A-2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.tags[:2] == ["hf-kd", "knowledge-distillation"] and "kl" in data.tags
    results = {(r.metric_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert results[("accuracy", "accuracy")] == pytest.approx(metrics["eval_accuracy"])
    assert results[("teacher accuracy", "accuracy")] == pytest.approx(metrics["eval_teacher_accuracy"])
    assert results[("teacher loss", "loss")] == pytest.approx(metrics["eval_teacher_loss"])
    assert all(r.task_type == "text-classification" for r in data.eval_results)
    text = card.text
    assert "AutoModelForSequenceClassification.from_pretrained" in text
    assert '"temperature": 2.0' in text and "weight=0.5" in text  # the spec and the built distiller
    assert "fewer" in text and "learning_rate" in text and "transformers:" in text
    if metrics["eval_teacher_accuracy"]:
        share = metrics["eval_accuracy"] / metrics["eval_teacher_accuracy"]
        assert f"accuracy {share:.1%}" in text

    trainer.create_model_card(dataset_tags="glue", tags=["sst2"], license="mit", language="en")  # Trainer's call
    data = front_matter(tmp_path).data
    assert data.datasets == ["glue"] and data.license == "mit" and data.language == "en"
    assert data.tags == ["hf-kd", "knowledge-distillation", "sst2", "kl"]
    assert {r.dataset_type for r in data.eval_results} == {"glue"}


def test_llama_causal_lm_card(tmp_path):
    student, teacher = llama(seed=1, hidden=16), llama(layers=3, seed=2)
    args = training_args(tmp_path, max_steps=2, teacher_eval_metrics=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  distillers=[{"name": "kl"}, {"name": "hidden_states", "weight": 0.1}],
                                  train_dataset=lm_data(), eval_dataset=lm_data(8, seed=4))
    trainer.train()
    metrics = trainer.evaluate()
    trainer.create_model_card(dataset="wikitext")
    data = front_matter(tmp_path).data
    assert data.base_model is None  # built from a config: no starting checkpoint
    assert data.pipeline_tag == "text-generation" and data.datasets == ["wikitext"]
    assert {"kl", "hidden_states"} <= set(data.tags)
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["loss"] == pytest.approx(metrics["eval_loss"])
    assert results["teacher loss"] == pytest.approx(metrics["eval_teacher_loss"])
    text = (tmp_path / "README.md").read_text()
    assert "AutoModelForCausalLM" in text and "projector" in text.lower()  # hidden_states' projector is listed


def test_card_without_evaluation_and_with_latency(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["ViTForImageClassification"]}')
    path = write_card(tmp_path, teacher="google/vit-base", teacher_params=1000, student_params=250,
                      latency_ms={"student": 1.0, "teacher": 3.0}, distiller_names=["kl"])
    card = ModelCard.load(path)
    assert card.data.pipeline_tag == "image-classification" and card.data.eval_results is None
    assert "3.00x speed-up" in card.text and "4.00x fewer" in card.text and "No evaluation" in card.text


def test_split_metrics_and_retention():
    history = [{"loss": 1.0}, {"eval_teacher_loss": 0.5, "eval_teacher_accuracy": 0.8, "eval_teacher_runtime": 1.0},
               {"eval_loss": 0.7, "eval_accuracy": 0.6, "eval_loss/kl": 0.1, "eval_distillation_loss": 0.9,
                "eval_teacher_agreement": 0.75, "eval_kl_to_teacher": 0.2, "eval_runtime": 2.0, "epoch": 1.0}]
    student, teachers = split_metrics(history)
    # the agreement metrics are the student's, though one of them starts like a teacher's key
    assert student == {"loss": 0.7, "accuracy": 0.6, "teacher_agreement": 0.75, "kl_to_teacher": 0.2}
    assert teachers == {"teacher": {"loss": 0.5, "accuracy": 0.8}}
    assert retention(student, teachers["teacher"]) == {"accuracy": pytest.approx(0.75)}
    several = [{"eval_teacher0_loss": 0.5, "eval_teacher0_accuracy": 0.8},
               {"eval_teacher1_loss": 0.4, "eval_teacher1_accuracy": 0.9}, {"eval_loss": 0.7, "eval_accuracy": 0.6}]
    student, teachers = split_metrics(several)
    assert list(teachers) == ["teacher0", "teacher1"] and teachers["teacher1"] == {"loss": 0.4, "accuracy": 0.9}


def test_two_teacher_card_names_each_teacher(tmp_path):
    student, first, second = bert(seed=1, hidden=16), bert(layers=3, seed=2, hidden=32), bert(seed=3, hidden=24)
    first.config._name_or_path, second.config._name_or_path = "org/big-teacher", "org/mid-teacher"
    args = training_args(tmp_path, max_steps=2, teacher_eval_metrics=True)
    trainer = DistillationTrainer(model=student, teacher_model=[first, second], args=args,
                                  distillers=[{"name": "kl"}], train_dataset=text_classification_data(),
                                  eval_dataset=text_classification_data(8, seed=3), compute_metrics=accuracy)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.evaluate()  # a second evaluation: its entry holds the agreement but no teacher metrics (measured once)
    trainer.create_model_card()
    card = front_matter(tmp_path)
    results = {(r.metric_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    for i in (0, 1):
        assert results[(f"teacher{i} accuracy", "accuracy")] == pytest.approx(metrics[f"eval_teacher{i}_accuracy"])
    assert results[("teacher_agreement", "teacher_agreement")] == pytest.approx(metrics["eval_teacher_agreement"])
    assert not any(name.startswith("teacher ") for name, _ in results)
    assert "teacher0: org/big-teacher, teacher1: org/mid-teacher" in card.text
    first_params = sum(p.numel() for p in first.parameters())
    assert f"vs {first_params:,} (teacher)" in card.text  # the ratios compare with teacher_model[0]
    assert "| metric | student | teacher0 | teacher1 |" in card.text


# ---- push_to_hub: the student only -----------------------------------------------------------------------------
def push(trainer):
    """trainer.push_to_hub() with the Hub replaced: returns the files upload_folder would send."""
    sent = {}

    def upload_folder(self, *, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)).replace(os.sep, "/")
                       for p in Path(folder_path).rglob("*") if p.is_file())
        sent["files"] = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        sent.update(kwargs)
        return "commit"

    with mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)), \
            mock.patch.object(HfApi, "upload_folder", upload_folder), \
            mock.patch("huggingface_hub.hf_api.get_session", side_effect=AssertionError("network")):
        assert trainer.push_to_hub(commit_message="student") == "commit"
    assert sent["repo_id"] == "me/student" and sent["token"] == "x"
    return sent["files"]


def tokenizer_files():
    with tempfile.TemporaryDirectory() as folder:
        tokenizer().save_pretrained(folder)
        return sorted(os.listdir(folder))


@pytest.mark.parametrize("distiller, extra", [
    ({"name": "kl"}, []),
    ({"name": "atsc", "projector": "mlp"}, [SHARED_CLASSIFIER_CONFIG, SHARED_CLASSIFIER_WEIGHTS]),
])
def test_push_to_hub_uploads_the_student_only(tmp_path, distiller, extra):
    trainer = classifier_trainer(tmp_path, [distiller], save_strategy="steps", save_steps=1, hub_model_id="me/student",
                                 hub_token="x", teacher_learning_rate=1e-3)
    trainer.processing_class = tokenizer()
    trainer.train()
    trainer.evaluate()
    assert (tmp_path / "checkpoint-2" / "distillers.json").is_file()
    assert (tmp_path / "checkpoint-2" / "distillers.pt").is_file() == (distiller["name"] == "atsc")
    for stray in ("teacher_cache/rows.arrow", "distillers.pt", "teacher_trained.pt", "runs/events.out"):
        (tmp_path / stray).parent.mkdir(exist_ok=True)
        (tmp_path / stray).write_text("not the student's")
    files = push(trainer)
    assert sorted(files) == sorted(["config.json", "model.safetensors", "README.md", *tokenizer_files(), *extra])
    assert not any(f.startswith("checkpoint-") or f.endswith(".pt") or f.endswith(".bin") for f in files)
    assert "training_args.bin" in os.listdir(tmp_path)  # written by the save, not uploaded
    assert ModelCard.load(tmp_path / "README.md").data.model_name == "student"


def test_recipe_card_is_the_same_writer_with_its_results_table(tmp_path):
    from hf_kd.recipes import write_model_card
    from hf_kd.recipes.report import ModelResult

    trainer = classifier_trainer(tmp_path, [{"name": "kl", "temperature": 4.0}])
    trainer.save_model(str(tmp_path / "student"))
    results = {"teacher": ModelResult("teacher", 32067, 130_000, 3.0, {"accuracy": 0.8}, None),
               "student": ModelResult("student (KD)", 7411, 30_000, 1.5, {"accuracy": 0.6}, 1.0)}
    path = write_model_card(tmp_path / "student", recipe="text_classification", teacher="org/teacher",
                            dataset="glue", distillers=[{"name": "kl", "temperature": 4.0}], results=results,
                            base_model="org/small", trainer=trainer)
    card = ModelCard.load(path)
    assert card.data.tags == ["hf-kd", "knowledge-distillation", "text_classification", "kl"]
    assert (card.data.base_model, card.data.datasets, card.data.pipeline_tag) == ("org/small", ["glue"],
                                                                                  "text-classification")
    assert {(r.metric_name, r.metric_value) for r in card.data.eval_results} == {("accuracy", 0.6),
                                                                                 ("teacher accuracy", 0.8)}
    text = card.text
    assert "| student (KD) | 7,411 |" in text and "2.00x speed-up" in text and "accuracy 75.0%" in text
    assert "hf-kd run recipes/text_classification.yaml" in text and "learning_rate" in text
    assert '[{"name": "kl", "temperature": 4.0}]' in text and "AutoModelForSequenceClassification" in text


def test_push_while_training_sends_the_student_and_no_checkpoint(tmp_path):
    """push_to_hub=True with hub_strategy=checkpoint: each save pushes the student's files only."""
    from concurrent.futures import Future

    pushes = []

    def upload_folder(self, *, folder_path, allow_patterns=None, ignore_patterns=None, path_in_repo=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)).replace(os.sep, "/")
                       for p in Path(folder_path).rglob("*") if p.is_file())
        pushes.append((path_in_repo, list(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                                ignore_patterns=ignore_patterns))))
        done = Future()
        done.set_result("commit")
        return done

    with mock.patch.object(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id)), \
            mock.patch.object(HfApi, "upload_folder", upload_folder), \
            mock.patch("huggingface_hub.hf_api.get_session", side_effect=AssertionError("network")):
        trainer = classifier_trainer(tmp_path, [{"name": "atsc", "projector": "mlp"}], save_strategy="steps",
                                     save_steps=1, push_to_hub=True, hub_model_id="me/student", hub_token="x",
                                     hub_strategy="checkpoint", teacher_learning_rate=1e-3)
        trainer.train()
        trainer._finish_current_push()
    assert len(pushes) == 2 and all(path is None for path, _ in pushes)
    expected = sorted(["config.json", "model.safetensors", "README.md", SHARED_CLASSIFIER_CONFIG,
                       SHARED_CLASSIFIER_WEIGHTS])
    assert all(sorted(files) == expected for _, files in pushes)

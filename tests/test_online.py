"""Online distillation support in the trainer: teacher-side parameters that learn beside the student."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import bert, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer, Distiller, Requirements, register_distiller
from hf_kd.trainer import TEACHER_STATE_NAME


@register_distiller("test_online_head")
class OnlineHead(Distiller):
    """The teacher's classifier learns CE on the labels plus KL toward the student; the student learns KL."""

    requires = Requirements(logits=True, labels=True)
    teacher_train_mode = True

    def setup(self, student, teacher):
        self.teacher_head = [teacher.classifier]  # a list: not a submodule, so not in this distiller's state

    def teacher_parameters(self):
        return self.teacher_head[0].parameters()

    def forward(self, student, teacher, batch):
        self.seen_teacher_training = teacher.model.training
        log_s, log_t = F.log_softmax(student.logits, -1), F.log_softmax(teacher.logits, -1)
        to_student = F.kl_div(log_s, log_t.detach(), log_target=True, reduction="batchmean")
        to_teacher = F.kl_div(log_t, log_s.detach(), log_target=True, reduction="batchmean")
        return to_student + F.cross_entropy(teacher.logits, batch["labels"]) + to_teacher


def build(output_dir, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 4, "learning_rate": 1e-2,
        "teacher_learning_rate": 5e-2, **overrides})
    teacher = bert(layers=3, seed=2, hidden_dropout_prob=0.1)
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=teacher, args=args,
                                  train_dataset=text_classification_data(), distillers=[{"name": "test_online_head"}])
    return trainer, teacher


def test_teacher_side_parameters_train_in_their_own_group_and_nothing_else_moves(tmp_path):
    trainer, teacher = build(str(tmp_path))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    assert [p.requires_grad for p in teacher.parameters()].count(True) == 2  # classifier weight and bias
    trainer.train()
    for name, param in teacher.named_parameters():
        changed = not torch.equal(before[name], param)
        assert changed == name.startswith("classifier"), name
    group = trainer.optimizer.param_groups[-1]
    assert [id(p) for p in group["params"]] == [id(p) for p in teacher.classifier.parameters()]
    assert group["initial_lr"] == 5e-2
    assert all(p.grad is None for p in teacher.parameters())  # cleared after every step
    assert trainer.distillers[0].seen_teacher_training  # teacher_train_mode: dropout on during training
    trainer.evaluate(text_classification_data())
    assert not trainer.distillers[0].seen_teacher_training and not teacher.training


def test_resume_restores_the_trained_teacher_parameters(tmp_path):
    full, full_teacher = build(str(tmp_path / "a"), max_steps=6, save_strategy="steps", save_steps=3)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    saved = torch.load(checkpoint / TEACHER_STATE_NAME)
    assert sorted(saved) == ["classifier.bias", "classifier.weight"]

    resumed, resumed_teacher = build(str(tmp_path / "b"), max_steps=6)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed_teacher.classifier.weight, full_teacher.classifier.weight)
    full_logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    resumed_logs = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    for step in (4, 5, 6):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], rel=1e-5)

    resumed.save_model(str(tmp_path / "student"))
    assert not os.path.exists(tmp_path / "student" / TEACHER_STATE_NAME)

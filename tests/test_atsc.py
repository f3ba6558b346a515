"""ATSC (adaptive teaching with a shared classifier): the shared path, its exact folding, the anchor, adaptation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

from conftest import bert, image_data, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer
from hf_kd.distillers.atsc import ATSCDistiller
from hf_kd.trainer import DISTILLER_STATE_NAME, OBJECTIVE, TEACHER_STATE_NAME


def build(output_dir, distiller=None, student=None, teacher=None, data=None, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 3, "learning_rate": 1e-2,
        "teacher_learning_rate": 1e-2, **overrides})
    student = student if student is not None else bert(seed=1, hidden=16)
    teacher = teacher if teacher is not None else bert(layers=3, seed=2, hidden=32)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=data if data is not None else text_classification_data(),
                                  distillers=[distiller or {"name": "atsc"}])
    return trainer, student, teacher


def batch(n=6):
    data = text_classification_data(n=n, seed=5)
    return {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}


def by_hand(student, teacher, distiller, inputs):
    """``W_t P(f_s) + b_t`` from the pooled student feature, and the plain student's logits (no hook)."""
    captured = {}
    handle = student.classifier.register_forward_pre_hook(lambda m, a: captured.setdefault("f", a[0]))
    student.eval()
    with torch.no_grad():
        plain = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        p = distiller.projectors[0]
        shared = F.linear(F.linear(captured["f"], p.weight, p.bias), teacher.classifier.weight, teacher.classifier.bias)
    handle.remove()
    return plain, shared


def test_fold_is_exact_after_setup_and_after_training(tmp_path):
    trainer, student, teacher = build(str(tmp_path))
    atsc = trainer.distillers[0]
    plain, shared = by_hand(student, teacher, atsc, batch())
    torch.testing.assert_close(plain, shared, atol=1e-5, rtol=0)
    projector_before = atsc.projectors[0].weight.detach().clone()
    trainer.train()
    assert not torch.equal(projector_before, atsc.projectors[0].weight)
    plain, shared = by_hand(student, teacher, atsc, batch())
    torch.testing.assert_close(plain, shared, atol=1e-5, rtol=0)
    # the fold in closed form
    w_t, p = teacher.classifier.weight, atsc.projectors[0]
    torch.testing.assert_close(student.classifier.weight, w_t @ p.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(student.classifier.bias, w_t @ p.bias + teacher.classifier.bias, atol=1e-6, rtol=0)


def test_training_logits_are_the_shared_path_and_the_hard_loss_is_ce_on_them(tmp_path):
    trainer, student, teacher = build(str(tmp_path))
    atsc = trainer.distillers[0]
    with torch.no_grad():  # break the fold so the hook's effect is visible
        student.classifier.weight.zero_()
        student.classifier.bias.fill_(3.0)
    inputs = batch()
    plain, shared = by_hand(student, teacher, atsc, inputs)
    assert not torch.allclose(plain, shared)
    student.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(student, dict(inputs), return_outputs=True)
    torch.testing.assert_close(outputs.logits, shared, atol=1e-5, rtol=0)
    components = trainer.ledger.pop_eval(lambda v: v.reshape(1))
    hard = F.cross_entropy(shared, inputs["labels"])
    assert components["hard"] == pytest.approx(hard.item(), rel=1e-5)
    # total = hard CE (trainer) + MSE + anchor (distiller): the distiller holds no CE
    assert components["atsc"] == pytest.approx(components["atsc/mse"] + components["atsc/anchor"], rel=1e-5)
    assert components[OBJECTIVE] == pytest.approx(hard.item() + components["atsc"], rel=1e-5)
    assert loss.item() == pytest.approx(hard.item(), rel=1e-5)  # evaluation returns the student's own loss
    # the hook is gone after compute_loss: the plain student is back
    plain_after, _ = by_hand(student, teacher, atsc, inputs)
    torch.testing.assert_close(plain_after, plain)


def test_eval_metrics_use_the_shared_path_equal_to_the_folded_student(tmp_path):
    trainer, student, teacher = build(str(tmp_path))
    trainer.train()
    atsc = trainer.distillers[0]
    seen = []
    trainer.compute_metrics = lambda p: seen.append(p) or {"n": float(len(p.label_ids))}
    data = text_classification_data(n=6, seed=5)
    trainer.evaluate(data)
    plain, shared = by_hand(student, teacher, atsc, batch())
    torch.testing.assert_close(torch.as_tensor(seen[0].predictions), shared, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.as_tensor(seen[0].predictions), plain, atol=1e-5, rtol=0)
    predicted = trainer.predict(data.remove_columns("labels")).predictions  # no labels: the plain student
    torch.testing.assert_close(torch.as_tensor(predicted), shared, atol=1e-5, rtol=0)


def test_anchor_by_hand_on_a_tiny_case():
    atsc = ATSCDistiller(anchor_weight=0.5)
    student, teacher = bert(seed=1, hidden=8, layers=1), bert(seed=2, hidden=8, layers=1)
    atsc.setup(student, [teacher])
    assert atsc.anchor().item() == 0.0
    with torch.no_grad():
        teacher.classifier.weight.add_(0.5)  # 3 x 8 -> 24 * 0.25 = 6
        teacher.classifier.bias.add_(7.0)  # 1-D: not anchored
        teacher.bert.embeddings.LayerNorm.weight.add_(1.0)  # 1-D: not anchored
        teacher.bert.pooler.dense.weight[0, 0] += 2.0  # +4
    assert atsc.anchor().item() == pytest.approx(10.0, rel=1e-6)
    anchored = {name for name, p in teacher.named_parameters() if p.dim() > 1}
    assert len(atsc._anchored) == len(anchored)
    assert sum(1 for n, _ in atsc.named_buffers()) == len(anchored)


def test_teacher_gets_gradients_from_the_mse_and_the_anchor(tmp_path):
    trainer, student, teacher = build(str(tmp_path), hard_label_weight=0.0)
    atsc = trainer.distillers[0]
    assert all(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher.bert.pooler.dense.weight.add_(0.1)  # anchor > 0
    trainer.model.train()
    teacher.train()
    inputs = batch()
    loss = trainer.compute_loss(student, dict(inputs))
    loss.backward()
    # no CE (hard_label_weight=0): the teacher encoder's gradients come from the MSE and the anchor only
    layer = teacher.bert.encoder.layer[0].attention.self.query.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0  # MSE reaches the teacher (not detached)
    pooler = teacher.bert.pooler.dense.weight.grad
    assert pooler is not None
    # anchor part of the pooler gradient: 2 * anchor_weight * (W - W0) = 0.2 everywhere, plus the MSE part
    for p in teacher.parameters():
        p.grad = None
    atsc.anchor_weight = 0.0
    trainer.compute_loss(student, dict(inputs)).backward()
    torch.testing.assert_close(pooler - teacher.bert.pooler.dense.weight.grad,
                               torch.full_like(pooler, 0.2), atol=1e-5, rtol=0)


def test_teacher_adapts_with_full_and_stays_bitwise_with_none(tmp_path):
    trainer, student, teacher = build(str(tmp_path / "full"))
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in teacher.named_parameters())
    assert trainer.state.log_history[0]["loss/atsc/anchor"] == 0.0
    assert trainer.state.log_history[1]["loss/atsc/anchor"] > 0.0

    trainer, student, teacher = build(str(tmp_path / "none"),
                                      distiller={"name": "atsc", "teacher_adaptation": "none"})
    atsc = trainer.distillers[0]
    assert list(atsc.buffers()) == [] and atsc.teacher_parameters() == []
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.train()
    for name, param in teacher.named_parameters():
        assert torch.equal(before[name], param), name
    plain, shared = by_hand(student, teacher, atsc, batch())
    torch.testing.assert_close(plain, shared, atol=1e-5, rtol=0)


def test_saved_student_reloads_with_the_shared_classifier_logits(tmp_path):
    trainer, student, teacher = build(str(tmp_path))
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student")).eval()
    inputs = batch()
    _, shared = by_hand(student, teacher, trainer.distillers[0], inputs)
    with torch.no_grad():
        logits = reloaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, shared, atol=1e-5, rtol=0)


def test_vit_pair(tmp_path):
    trainer, student, teacher = build(str(tmp_path), student=vit(seed=1, hidden=16), teacher=vit(seed=2, layers=3),
                                      data=image_data())
    trainer.train()
    atsc = trainer.distillers[0]
    pixels = torch.tensor(image_data(n=4, seed=3)["pixel_values"])
    captured = {}
    handle = student.classifier.register_forward_pre_hook(lambda m, a: captured.setdefault("f", a[0]))
    with torch.no_grad():
        plain = student.eval()(pixel_values=pixels).logits
        shared = teacher.classifier(atsc.projectors[0](captured["f"]))
    handle.remove()
    torch.testing.assert_close(plain, shared, atol=1e-5, rtol=0)


def test_resume_gives_identical_losses(tmp_path):
    full, _, full_teacher = build(str(tmp_path / "a"), max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    state = torch.load(checkpoint / DISTILLER_STATE_NAME)
    assert "0.projectors.0.weight" in state and any(k.startswith("0.anchor_") for k in state)
    assert (checkpoint / TEACHER_STATE_NAME).is_file()
    resumed, _, resumed_teacher = build(str(tmp_path / "b"), max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full_logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    resumed_logs = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    for step in (3, 4):
        assert resumed_logs[step]["loss"] == pytest.approx(full_logs[step]["loss"], rel=1e-5)
        assert resumed_logs[step]["loss/atsc/anchor"] == pytest.approx(full_logs[step]["loss/atsc/anchor"], rel=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="peft_config"):
        ATSCDistiller(peft_config={"r": 2})
    with pytest.raises(ValueError, match="projector"):
        ATSCDistiller(projector="conv")
    with pytest.raises(ValueError, match="teacher_adaptation"):
        ATSCDistiller(teacher_adaptation="partial")
    with pytest.raises(ValueError, match="num_labels=3"):
        ATSCDistiller().setup(bert(num_labels=2, hidden=8, layers=1), [bert(num_labels=3, hidden=8, layers=1)])
    with pytest.raises(ValueError, match="no submodule"):
        ATSCDistiller(head_module="score").setup(bert(hidden=8, layers=1), [bert(hidden=8, layers=1)])
    with pytest.raises(ValueError, match="teacher_model"):
        ATSCDistiller().setup(bert(hidden=8, layers=1), [])

"""ATSC beyond one teacher with full adaptation: several teachers (average / learned mixing), LoRA adaptation,
and the non-linear projector's export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bert, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer, load_atsc_student
from hf_kd.distillers.atsc import SHARED_CLASSIFIER_CONFIG, SHARED_CLASSIFIER_WEIGHTS, SharedClassifier
from hf_kd.trainer import TEACHER_STATE_NAME


def build(output_dir, distiller, teachers=None, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 3, "learning_rate": 1e-2,
        "teacher_learning_rate": 1e-2, **overrides})
    student = bert(seed=1, hidden=16)
    teachers = teachers if teachers is not None else [bert(layers=3, seed=2, hidden=32), bert(seed=3, hidden=24)]
    trainer = DistillationTrainer(model=student, teacher_model=teachers, args=args,
                                  train_dataset=text_classification_data(), distillers=[{"name": "atsc", **distiller}])
    return trainer, student, teachers


def batch(n=6):
    data = text_classification_data(n=n, seed=5)
    return {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}


def pooled(model, inputs):
    """The input of ``model.classifier`` and the model's own logits (no ATSC hook involved)."""
    captured = {}
    handle = model.classifier.register_forward_pre_hook(lambda m, a: captured.setdefault("f", a[0]))
    with torch.no_grad():
        logits = model.eval()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    handle.remove()
    return captured["f"], logits


def shared_by_hand(atsc, teachers, features, alphas):
    with torch.no_grad():
        return sum(a * t.classifier(p(features)) for a, p, t in zip(alphas, atsc.projectors, teachers))


@pytest.mark.parametrize("combine", ["average", "learned"])
def test_two_teachers_fold_exactly(tmp_path, combine):
    trainer, student, teachers = build(str(tmp_path), {"combine": combine})
    atsc = trainer.distillers[0]
    assert [p.out_features for p in atsc.projectors] == [32, 24]
    f_s, plain = pooled(student, batch())
    torch.testing.assert_close(plain, shared_by_hand(atsc, teachers, f_s, [0.5, 0.5]), atol=1e-5, rtol=0)
    trainer.train()
    alphas = atsc.mixing().detach()
    if combine == "learned":
        assert not torch.allclose(alphas, torch.full((2,), 0.5))  # beta learns from the CE on the shared logits
        assert alphas.sum().item() == pytest.approx(1.0)
    else:
        assert alphas.tolist() == [0.5, 0.5]
    f_s, plain = pooled(student, batch())
    torch.testing.assert_close(plain, shared_by_hand(atsc, teachers, f_s, alphas), atol=1e-5, rtol=0)


def test_mse_is_the_mean_over_teachers(tmp_path):
    trainer, student, teachers = build(str(tmp_path), {})
    atsc, inputs = trainer.distillers[0], batch()
    with torch.no_grad():
        trainer.compute_loss(student.eval(), dict(inputs))
    values = trainer.ledger.pop_eval(lambda v: v.reshape(1))
    f_s, _ = pooled(student, inputs)
    with torch.no_grad():
        mses = [F.mse_loss(p(f_s), pooled(t, inputs)[0]) for p, t in zip(atsc.projectors, teachers)]
    assert values["atsc/mse"] == pytest.approx(((mses[0] + mses[1]) / 2).item(), rel=1e-5)


def test_lora_adapts_only_adapters_and_the_anchor_is_the_weight_delta(tmp_path):
    trainer, student, teachers = build(str(tmp_path), {"teacher_adaptation": "lora", "peft_config": {"r": 2}},
                                       max_steps=4)
    atsc = trainer.distillers[0]
    base = {(k, n): p.detach().clone() for k, t in enumerate(teachers) for n, p in t.named_parameters()
            if ".atsc." not in n}
    adapters = {(k, n): p.detach().clone() for k, t in enumerate(teachers) for n, p in t.named_parameters()
                if ".atsc." in n}
    assert adapters and {id(p) for p in atsc.teacher_parameters()} == {
        id(p) for t in teachers for n, p in t.named_parameters() if ".atsc." in n}
    assert all(not t.training for t in teachers)
    trainer.train()
    for k, teacher in enumerate(teachers):
        for name, param in teacher.named_parameters():
            if (k, name) in base:
                assert torch.equal(base[(k, name)], param), name  # base weights bitwise unchanged
    assert any(not torch.equal(adapters[key], p) for key, p in (
        ((k, n), p) for k, t in enumerate(teachers) for n, p in t.named_parameters() if ".atsc." in n))
    # the anchor is sum ||W_adapted - W0||^2 with W_adapted - W0 = scale * B A, formed explicitly here
    expected = 0.0
    for teacher in teachers:
        for module in teacher.modules():
            if hasattr(module, "lora_A") and "atsc" in module.lora_A:
                delta = module.scaling["atsc"] * module.lora_B["atsc"].weight @ module.lora_A["atsc"].weight
                expected += delta.pow(2).sum().item()
    assert expected > 0
    assert atsc.anchor().item() == pytest.approx(expected, rel=1e-4)
    f_s, plain = pooled(student, batch())
    torch.testing.assert_close(plain, shared_by_hand(atsc, teachers, f_s, [0.5, 0.5]), atol=1e-5, rtol=0)


def test_lora_resume_with_two_teachers_gives_identical_losses(tmp_path):
    options = {"teacher_adaptation": "lora", "combine": "learned"}
    full, _, _ = build(str(tmp_path / "a"), options, max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(checkpoint / TEACHER_STATE_NAME)
    assert {k.split(".")[0] for k in saved} == {"0", "1"} and all(".atsc." in k for k in saved)
    resumed, _, _ = build(str(tmp_path / "b"), options, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    full_logs = {h["step"]: h["loss"] for h in full.state.log_history if "loss" in h}
    resumed_logs = {h["step"]: h["loss"] for h in resumed.state.log_history if "loss" in h}
    for step in (3, 4):
        assert resumed_logs[step] == pytest.approx(full_logs[step], rel=1e-5)


def test_mlp_projector_exports_a_shared_classifier_that_loads_back(tmp_path):
    trainer, student, teachers = build(str(tmp_path), {"projector": "mlp", "combine": "learned"})
    trainer.train()
    atsc = trainer.distillers[0]
    data = text_classification_data(n=6, seed=5)
    predicted = torch.as_tensor(trainer.predict(data.remove_columns("labels")).predictions)
    inputs = batch()
    captured = {}
    handle = student.classifier.register_forward_pre_hook(lambda m, a: captured.setdefault("f", a[0]))
    with torch.no_grad():
        student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    handle.remove()
    expected = shared_by_hand(atsc, teachers, captured["f"], atsc.mixing().detach())
    torch.testing.assert_close(predicted, expected, atol=1e-5, rtol=0)  # predict() takes the shared path

    trainer.save_model(str(tmp_path / "student"))
    assert (tmp_path / "student" / SHARED_CLASSIFIER_WEIGHTS).is_file()
    assert (tmp_path / "student" / SHARED_CLASSIFIER_CONFIG).is_file()
    reloaded = load_atsc_student(str(tmp_path / "student")).eval()
    assert isinstance(reloaded.classifier, SharedClassifier)
    with torch.no_grad():
        logits = reloaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # a plain from_pretrained gives the student's own (unused, untrained) head: not the prediction
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student")).eval()
    with torch.no_grad():
        own = plain(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert not torch.allclose(own, expected, atol=1e-3)


def test_linear_export_writes_no_shared_classifier_file(tmp_path):
    trainer, _, _ = build(str(tmp_path), {}, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student" / SHARED_CLASSIFIER_WEIGHTS).exists()
    reloaded = load_atsc_student(str(tmp_path / "student"))
    assert isinstance(reloaded.classifier, torch.nn.Linear)

"""DistillationTrainer behaviour: loss mixing, logging, gradient accumulation, resume, export, model families."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoModelForSequenceClassification

from conftest import bert, gpt2, image_data, llama, lm_data, text_classification_data, training_args, vit
from hf_kd import (
    DistillationArguments,
    DistillationCallback,
    DistillationTrainer,
    Distiller,
    Requirements,
    register_distiller,
)
from hf_kd.trainer import DISTILLER_STATE_NAME


def make_args(output_dir, **overrides) -> DistillationArguments:
    return training_args(output_dir, **{"per_device_eval_batch_size": 4, "logging_steps": 1, "seed": 0, **overrides})


def collate(features):
    return {key: torch.tensor([f[key] for f in features]) for key in features[0]}


def batch_of(dataset, n=None):
    return collate([dataset[i] for i in range(n or len(dataset))])


@register_distiller("test_scaled_kl")
class ScaledKL(Distiller):
    """KL(p_t || softmax(scale * z_s)) with a learned scale: a distiller with state and its own parameters."""

    requires = Requirements(logits=True)

    def __init__(self, weight=1.0):
        super().__init__(weight)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, student, teacher, batch):
        log_s = F.log_softmax(student.logits * self.scale, -1)
        return F.kl_div(log_s, F.log_softmax(teacher.logits, -1), log_target=True, reduction="batchmean")


def explicit_lm_kl(student_logits, teacher_logits, labels, temperature=1.0):
    s = student_logits[:, :-1] / temperature
    t = teacher_logits[:, :-1] / temperature
    mask = labels[:, 1:] != -100
    kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    return (kl * mask).sum() / mask.sum() * temperature**2


# ---- the loss ---------------------------------------------------------------------------------------------------
def test_compute_loss_on_fresh_trainer_mixes_hard_and_distillation_terms(output_dir):
    student, teacher = bert(seed=1), bert(layers=3, seed=2)
    data = text_classification_data()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(output_dir, hard_label_weight=0.3),
        distillers=[{"name": "kl", "temperature": 2.0, "weight": 0.7}], train_dataset=data,
    )
    batch = batch_of(data, 8)
    loss = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        s = student(**batch)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = F.cross_entropy(s.logits, batch["labels"])
    p_t, log_p_t, log_p_s = F.softmax(t / 2, -1), F.log_softmax(t / 2, -1), F.log_softmax(s.logits / 2, -1)
    kl = (p_t * (log_p_t - log_p_s)).sum(-1).mean() * 4
    torch.testing.assert_close(loss, 0.3 * ce + 0.7 * kl)


@pytest.mark.parametrize("factory", [llama, gpt2])
def test_fused_lm_path_equals_plain_logits_path(output_dir, factory):
    data = lm_data(n=6)
    batch = batch_of(data)
    results = []
    for fused in (True, False):
        student, teacher = factory(seed=1), factory(layers=3, seed=2)
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher,
            args=make_args(output_dir, fused_lm_loss=fused, loss_chunk_size=7, hard_label_weight=0.5),
            distillers=[{"name": "kl", "temperature": 2.0}, {"name": "jsd", "beta": 0.3, "weight": 0.2}],
        )
        assert trainer._fused_lm is fused
        student.train()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
        assert all(p.grad is None for p in teacher.parameters())

    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)

    # and both equal the explicit formula: 0.5 * CE + KL_T=2 + 0.2 * JSD
    student, teacher = factory(seed=1), factory(layers=3, seed=2)
    with torch.no_grad():
        out = student(**batch)
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kl = explicit_lm_kl(out.logits, t_logits, batch["labels"], temperature=2.0)
    jsd = _explicit_lm_jsd(out.logits, t_logits, batch)
    assert torch.allclose(plain_loss, 0.5 * out.loss + kl + 0.2 * jsd, atol=1e-5)


def _explicit_lm_jsd(s_logits, t_logits, batch, beta=0.3):
    s, t = s_logits[:, :-1].softmax(-1), t_logits[:, :-1].softmax(-1)
    m = beta * t + (1 - beta) * s
    jsd = beta * (t * (t / m).log()).sum(-1) + (1 - beta) * (s * (s / m).log()).sum(-1)
    mask = batch["labels"][:, 1:] != -100
    return (jsd * mask).sum() / mask.sum()


def test_lm_without_labels_distils_on_attended_tokens(output_dir):
    data = lm_data(n=6, with_labels=False)
    batch = batch_of(data)
    student, teacher = llama(seed=1), llama(layers=3, seed=2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(output_dir, hard_label_weight=0.0),
        distillers=[{"name": "kl"}],
    )
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s, t = student(**batch).logits, teacher(**batch).logits
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(loss.detach(), explicit_lm_kl(s, t, labels))


def test_gradients_reach_student_and_distiller_never_teacher(output_dir):
    student, teacher = bert(seed=1), bert(layers=3, seed=2)
    data = text_classification_data()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(output_dir),
        distillers=[{"name": "kl"}, {"name": "test_scaled_kl"}],
    )
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    student.train()
    trainer.compute_loss(student, dict(batch_of(data, 8))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters()
               if "pooler" in n or "classifier" in n)
    assert trainer.distillers[1].scale.grad is not None and trainer.distillers[1].scale.grad.abs() > 0
    assert all(p.grad is None for p in teacher.parameters())

    optimizer = trainer.create_optimizer()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(trainer.distillers[1].scale) in in_optimizer
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    assert optimizer.param_groups[-1]["params"] == [trainer.distillers[1].scale]


def test_logit_only_run_requests_no_hidden_states_or_attentions(output_dir):
    student, teacher = bert(seed=1), bert(layers=3, seed=2)
    seen = []
    for model in (student, teacher):
        model.register_forward_hook(lambda m, args, kwargs, out: seen.append(out), with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_args(output_dir),
                                  distillers=[{"name": "kl"}])
    trainer.compute_loss(student, dict(batch_of(text_classification_data(), 4)))
    assert len(seen) == 2
    assert all(out.hidden_states is None and out.attentions is None for out in seen)


def test_teacher_dtype_and_placement(output_dir):
    teacher = bert(layers=3, seed=2)
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=teacher,
                                  args=make_args(output_dir, teacher_dtype="bfloat16"), distillers=[{"name": "kl"}])
    assert all(p.dtype == torch.bfloat16 for p in trainer.teacher.parameters())
    loss = trainer.compute_loss(trainer.model, dict(batch_of(text_classification_data(), 4)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---- logging and callbacks --------------------------------------------------------------------------------------
class Recorder(DistillationCallback):
    def __init__(self):
        self.steps = []

    def on_distillation_step(self, args, state, control, losses, **kwargs):
        self.steps.append((state.global_step, losses))


def test_logged_components_average_over_window_and_reach_callbacks(output_dir):
    student, teacher = bert(seed=1), bert(layers=3, seed=2)
    recorder = Recorder()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher,
        args=make_args(output_dir, max_steps=4, logging_steps=2, hard_label_weight=0.5, gradient_accumulation_steps=2,
                       per_device_train_batch_size=2),
        distillers=[{"name": "kl", "weight": 2.0}, {"name": "tvd", "weight": 0.0}],
        train_dataset=text_classification_data(), callbacks=[recorder],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    assert [s for s, _ in recorder.steps] == [1, 2, 3, 4]
    for log in logs:
        assert {"loss/hard", "loss/kl", "loss/tvd"} <= log.keys()
        # the components combine into the logged loss exactly as the loss is built
        assert log["loss"] == pytest.approx(0.5 * log["loss/hard"] + 2.0 * log["loss/kl"], rel=1e-5)
    for _step, losses in recorder.steps:
        assert losses["loss"] == pytest.approx(0.5 * losses["loss/hard"] + 2.0 * losses["loss/kl"], rel=1e-5)
    # the window average of the per-step values is what got logged
    first_window = [losses for step, losses in recorder.steps if step <= 2]
    assert logs[0]["loss/kl"] == pytest.approx(sum(step["loss/kl"] for step in first_window) / 2, rel=1e-5)
    assert logs[0]["loss"] == pytest.approx(sum(step["loss"] for step in first_window) / 2, rel=1e-5)


def test_weight_schedule_is_applied_per_step(output_dir):
    recorder = Recorder()
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=bert(layers=3, seed=2),
        args=make_args(output_dir, max_steps=4, hard_label_weight=0.0),
        distillers=[{"name": "kl", "weight": {"schedule": "linear", "start": 0.0, "end": 1.0}}],
        train_dataset=text_classification_data(), callbacks=[recorder],
    )
    trainer.train()
    for step, losses in recorder.steps:
        weight = (step - 1) / 4  # value applied at the start of step `step` (global_step = step - 1)
        assert losses["loss"] == pytest.approx(weight * losses["loss/kl"], rel=1e-5, abs=1e-9)


def test_eval_components_and_teacher_metrics(output_dir):
    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    data = text_classification_data()
    teacher = bert(layers=3, seed=2)
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=teacher, args=make_args(output_dir, teacher_eval_metrics=True),
        distillers=[{"name": "kl"}], eval_dataset=data, compute_metrics=accuracy,
    )
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss/hard", "eval_loss/kl", "eval_accuracy", "eval_teacher_accuracy"} <= metrics.keys()
    objective = metrics["eval_loss/hard"] + metrics["eval_loss/kl"]  # issue 11: eval_loss is the student's own loss
    assert metrics["eval_distillation_loss"] == pytest.approx(objective, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_loss/hard"], rel=1e-6)
    with torch.no_grad():
        batch = batch_of(data)
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = (teacher_logits.argmax(-1) == batch["labels"]).float().mean().item()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(expected)


# ---- gradient accumulation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["classifier", "causal_lm"])
def test_gradient_accumulation_4x2_equals_1x8(output_dir, family):
    if family == "classifier":
        factory, data = bert, text_classification_data(n=8)
    else:
        factory, data = llama, lm_data(n=8)
    runs = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        student = factory(seed=1)
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer = DistillationTrainer(
            model=student, teacher_model=factory(layers=3, seed=2),
            args=make_args(output_dir, max_steps=1, per_device_train_batch_size=batch_size,
                           gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                           max_grad_norm=0.0, lr_scheduler_type="constant", hard_label_weight=0.5),
            distillers=[{"name": "kl", "temperature": 2.0}], train_dataset=data,
        )
        trainer.train()
        delta = {n: before[n] - p.detach() for n, p in student.named_parameters()}
        runs.append((trainer.state.log_history[0], delta))
    (log_a, delta_a), (log_b, delta_b) = runs
    for key in ("loss", "loss/hard", "loss/kl"):
        assert log_a[key] == pytest.approx(log_b[key], rel=1e-5)
    for name in delta_a:
        torch.testing.assert_close(delta_a[name], delta_b[name], atol=1e-6, rtol=1e-4)


# ---- resume -----------------------------------------------------------------------------------------------------
def test_resume_from_checkpoint_continues_with_identical_losses(output_dir):
    def build(out):
        return DistillationTrainer(
            model=bert(seed=1), teacher_model=bert(layers=3, seed=2),
            args=make_args(out, max_steps=6, save_strategy="steps", save_steps=3, per_device_train_batch_size=2,
                           learning_rate=1e-2),
            distillers=[{"name": "kl", "temperature": {"schedule": "cosine", "start": 4.0, "end": 1.0}},
                        {"name": "test_scaled_kl", "weight": 0.5},
                        {"name": "hidden_states", "projector": "linear", "weight": 0.1}],
            train_dataset=text_classification_data(),
        )

    full = build(output_dir)
    full.train()
    full_losses = {h["step"]: h for h in full.state.log_history if "loss" in h}
    checkpoint = os.path.join(output_dir, "checkpoint-3")
    saved = torch.load(os.path.join(checkpoint, DISTILLER_STATE_NAME))
    assert saved["1.scale"] != 1.0  # the learned parameter moved and was checkpointed

    resumed = build(output_dir + "_resumed")
    resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.distillers[1].scale.item() == pytest.approx(full.distillers[1].scale.item(), rel=1e-6)
    for key, value in full.distillers.state_dict().items():  # the projector too
        torch.testing.assert_close(resumed.distillers.state_dict()[key], value)
    resumed_losses = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]  # 1-3 come back from the checkpoint's trainer state
    for step in (4, 5, 6):
        for key in ("loss", "loss/hard", "loss/kl", "loss/test_scaled_kl", "loss/hidden_states"):
            assert resumed_losses[step][key] == pytest.approx(full_losses[step][key], rel=1e-5), (step, key)


# ---- export -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, teacher_kwargs, data, auto_class",
    [
        (bert, {"layers": 3, "hidden": 48}, text_classification_data, AutoModelForSequenceClassification),
        (llama, {"layers": 3, "hidden": 48}, lm_data, AutoModelForCausalLM),
        (gpt2, {"layers": 3, "hidden": 48}, lm_data, AutoModelForCausalLM),
        (vit, {"layers": 3, "hidden": 48}, image_data, AutoModelForImageClassification),
    ],
)
def test_train_export_and_reload_gives_identical_logits(output_dir, factory, teacher_kwargs, data, auto_class):
    student, teacher = factory(seed=1), factory(seed=2, **teacher_kwargs)
    dataset = data()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=make_args(output_dir, max_steps=3),
        distillers=[{"name": "kl", "temperature": 2.0}, {"name": "test_scaled_kl"}], train_dataset=dataset,
    )
    trainer.train()
    export = os.path.join(output_dir, "student")
    trainer.save_model(export)
    assert not os.path.exists(os.path.join(export, DISTILLER_STATE_NAME))

    reloaded = auto_class.from_pretrained(export).eval()
    assert set(reloaded.state_dict()) == set(student.state_dict())
    assert all(reloaded.state_dict()[k].shape == v.shape for k, v in student.state_dict().items())
    teacher_shapes = {tuple(v.shape) for v in teacher.state_dict().values()}
    assert not any(tuple(v.shape) in teacher_shapes and v.dim() > 1 and 48 in v.shape
                   for v in reloaded.state_dict().values())

    batch = batch_of(dataset, 4)
    batch.pop("labels")
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, student(**batch).logits, rtol=0, atol=0)

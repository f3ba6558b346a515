"""Teacher-free KD: DR-KD's rectified teacher (``rectify=True`` on every logit distiller), Tf-KD's virtual teacher
(``virtual_teacher``) and the self-teacher (``make_self_teacher``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainingArguments

import hf_kd.self_teacher
from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer, ModelView, build_distiller, make_self_teacher
from hf_kd.distillers.divergences import rectified

pytestmark = pytest.mark.usefixtures("one_thread")

LOGIT_DISTILLERS = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse", "dkd")


def collate(dataset):
    return {key: torch.tensor(dataset[key]) for key in dataset.column_names}


def classifier_views(student_logits, teacher_logits):
    return (ModelView(model=None, task="classification", logits=student_logits),
            ModelView(model=None, task="classification", logits=teacher_logits))


# ---- rectify (DR-KD) ----------------------------------------------------------------------------------------------
def test_rectified_swaps_the_top_and_true_logits_where_the_teacher_is_wrong():
    teacher = torch.tensor([[3.0, 1.0, 2.0],   # top 0, true 1: swapped
                            [1.0, 5.0, 0.0],   # right: unchanged
                            [2.0, 2.0, 1.0],   # true class 1 tied with the top: unchanged values
                            [2.0, 2.0, 1.0],   # tied top 0 and 1, true 2: the first top (0) is swapped with 2
                            [0.0, 4.0, 4.0]])  # top 1 tied with the true class 2: unchanged values
    targets = torch.tensor([1, 1, 1, 2, 2])
    original = teacher.clone()
    expected = torch.tensor([[1.0, 3.0, 2.0], [1.0, 5.0, 0.0], [2.0, 2.0, 1.0], [1.0, 2.0, 2.0], [0.0, 4.0, 4.0]])
    assert torch.equal(rectified(teacher, targets), expected)
    assert torch.equal(teacher, original)  # other row terms read the same chunk


def loss_and_gradients(trainer, student, batch):
    """One training ``compute_loss`` and backward: the loss and every student gradient."""
    student.train()
    loss = trainer.compute_loss(student, dict(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}


def assert_same_loss_and_gradients(fused, plain):
    torch.testing.assert_close(fused[0], plain[0])
    for name, grad in plain[1].items():
        torch.testing.assert_close(fused[1][name], grad, atol=1e-6, rtol=1e-4)


def test_kl_with_rectify_is_the_kl_to_the_swapped_teacher():
    student = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, -1.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([2, 1])  # row 0: the teacher says 0, the truth is 2; row 1: right
    swapped = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    t = 2.0
    p_t, log_p_t, log_p_s = F.softmax(swapped / t, -1), F.log_softmax(swapped / t, -1), F.log_softmax(student / t, -1)
    expected = (p_t * (log_p_t - log_p_s)).sum(-1).mean() * t * t
    distiller = build_distiller({"name": "kl", "temperature": t, "rectify": True})
    loss = distiller(*classifier_views(student, teacher), {"labels": labels})
    torch.testing.assert_close(loss, expected)
    plain = build_distiller({"name": "kl", "temperature": t})(*classifier_views(student, teacher), {"labels": labels})
    assert not torch.allclose(loss, plain)


@pytest.mark.parametrize("name", LOGIT_DISTILLERS)
def test_rectify_changes_only_the_rows_the_teacher_gets_wrong(name):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    right = {"labels": teacher.argmax(-1)}
    wrong = {"labels": (teacher.argmax(-1) + 1) % 5}
    views = classifier_views(student, teacher)
    plain = build_distiller({"name": name})
    rectifying = build_distiller({"name": name, "rectify": True})
    assert rectifying.requires.labels
    torch.testing.assert_close(rectifying(*views, right), plain(*views, right), rtol=0, atol=0)
    on_wrong = rectifying(*views, wrong)
    swapped_views = classifier_views(student, rectified(teacher, wrong["labels"]))
    torch.testing.assert_close(on_wrong, plain(*swapped_views, wrong))
    assert not torch.allclose(on_wrong, plain(*views, wrong))


def explicit_lm_kl(student_logits, teacher_logits, labels, temperature, swap=True):
    """Token-level KL against the teacher, with each wrong row's top and next-token logits swapped by hand."""
    s, t = student_logits[:, :-1].reshape(-1, student_logits.shape[-1]), teacher_logits[:, :-1].reshape(
        -1, teacher_logits.shape[-1]).clone()
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    s, t, targets = s[keep], t[keep], targets[keep]
    for row in range(len(t) if swap else 0):
        top, true = int(t[row].argmax()), int(targets[row])
        t[row, top], t[row, true] = t[row, true].item(), t[row, top].item()
    s, t = s / temperature, t / temperature
    return (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean() * temperature**2


def test_fused_lm_path_equals_the_plain_logits_path_with_rectify(tmp_path):
    data = lm_data(n=6)
    batch = collate(data)
    results = []
    for fused in (True, False):
        student, teacher = llama(seed=1), llama(layers=3, seed=2, initializer_range=0.2)  # logits far apart
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher,
            args=training_args(tmp_path, fused_lm_loss=fused, loss_chunk_size=7, hard_label_weight=0.0),
            distillers=[{"name": "kl", "rectify": True}],
        )
        assert trainer._fused_lm is fused
        results.append(loss_and_gradients(trainer, student, batch))
    assert_same_loss_and_gradients(*results)
    plain_loss = results[1][0]

    student, teacher = llama(seed=1), llama(layers=3, seed=2, initializer_range=0.2)
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    torch.testing.assert_close(plain_loss, explicit_lm_kl(s_logits, t_logits, labels, 1.0), rtol=1e-5, atol=0)
    unrectified = explicit_lm_kl(s_logits, t_logits, labels, 1.0, swap=False)
    assert abs(plain_loss - unrectified) > 1e-3 * unrectified


def test_rectify_without_labels_is_refused_on_the_first_batch_naming_the_option(tmp_path):
    trainer = DistillationTrainer(
        model=llama(seed=0), teacher_model=llama(seed=1), args=training_args(tmp_path, hard_label_weight=0.0),
        distillers=[{"name": "kl", "rectify": True}], train_dataset=lm_data(with_labels=False),
    )
    with pytest.raises(ValueError, match=r"Distillers \['kl'\] need `labels`.*rectify=True.*set rectify=False"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_rectify_that_is_not_a_bool_is_refused_when_built():
    with pytest.raises(ValueError, match=r"kl: `rectify` is true or false, got 'yes'"):
        build_distiller({"name": "kl", "rectify": "yes"})


# ---- virtual_teacher (Tf-KD_reg) ----------------------------------------------------------------------------------
def test_virtual_teacher_loss_is_the_hand_computed_kl_in_both_forms():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2])
    t, a = 2.0, 0.9
    # the virtual teacher of a row: [0.9, 0.05, 0.05] around its true class
    virtual = [[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]]

    def kl(p, log_q):
        return sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, log_q))

    def log_softmax(z):
        top = math.log(sum(math.exp(v) for v in z))
        return [v - top for v in z]

    tempered = []
    for row, p in zip(student.tolist(), virtual):
        p_t = [math.exp(v) for v in log_softmax([math.log(pc) / t for pc in p])]
        tempered.append(kl(p_t, log_softmax([v / t for v in row])) * t * t)
    reference = []
    for row, p in zip(student.tolist(), virtual):
        p_t = [math.exp(v) for v in log_softmax([pc / t for pc in p])]
        reference.append(kl(p_t, log_softmax(row)))
    for form, per_row in (("tempered", tempered), ("reference", reference)):
        distiller = build_distiller({"name": "virtual_teacher", "temperature": t, "correct_prob": a, "form": form})
        view = ModelView(model=None, task="classification", logits=student)
        assert distiller(view, None, {"labels": labels}).item() == pytest.approx(sum(per_row) / 2, rel=1e-6)


def test_virtual_teacher_on_causal_lm_rows_targets_the_next_tokens():
    data = lm_data(n=3, vocab=11)
    batch = collate(data)
    logits = torch.randn(3, 12, 11, generator=torch.Generator().manual_seed(0))
    distiller = build_distiller({"name": "virtual_teacher", "correct_prob": 0.8})
    loss = distiller(ModelView(model=None, task="causal_lm", logits=logits), None, batch)
    targets = batch["labels"][:, 1:].reshape(-1)
    keep = targets != -100
    p = torch.full((int(keep.sum()), 11), 0.2 / 10).scatter_(-1, targets[keep].unsqueeze(-1), 0.8)
    log_s = F.log_softmax(logits[:, :-1].reshape(-1, 11)[keep], -1)
    torch.testing.assert_close(loss, (p * (p.log() - log_s)).sum(-1).mean())


@pytest.mark.parametrize("family", ["classifier", "causal_lm"])
def test_virtual_teacher_trains_the_student_without_any_teacher(tmp_path, family):
    student, data = (bert(seed=1), text_classification_data(n=8)) if family == "classifier" else (llama(seed=1),
                                                                                                    lm_data(n=8))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(
        model=student, args=training_args(tmp_path, max_steps=1, logging_steps=1, hard_label_weight=0.0,
                                          learning_rate=1e-2),
        train_dataset=data, distillers=[{"name": "virtual_teacher", "temperature": 2.0}],
    )
    assert trainer.teachers == []
    trainer.train()
    logged = trainer.state.log_history[0]["loss/virtual_teacher"]
    assert math.isfinite(logged) and logged > 0
    moved = [n for n, p in student.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)  # every parameter: the gradient reaches the whole student


def test_virtual_teacher_without_a_teacher_takes_the_fused_lm_path(tmp_path):
    batch = collate(lm_data(n=6))
    results = []
    for fused in (True, False):
        student = llama(seed=1)
        trainer = DistillationTrainer(
            model=student, args=training_args(tmp_path, fused_lm_loss=fused, loss_chunk_size=7, hard_label_weight=0.5),
            distillers=[{"name": "virtual_teacher", "temperature": 2.0}],
        )
        assert trainer._fused_lm is fused
        results.append(loss_and_gradients(trainer, student, batch))
    assert_same_loss_and_gradients(*results)
    plain_loss = results[1][0]
    with torch.no_grad():
        outputs = llama(seed=1)(**batch)
    view = ModelView(model=None, task="causal_lm", logits=outputs.logits)
    virtual = build_distiller({"name": "virtual_teacher", "temperature": 2.0})(view, None, batch)
    torch.testing.assert_close(plain_loss, 0.5 * outputs.loss + virtual)


def test_bad_virtual_teacher_options_are_refused_when_built():
    with pytest.raises(ValueError, match=r"`correct_prob` must lie in \(0, 1\]"):
        build_distiller({"name": "virtual_teacher", "correct_prob": 0.0})
    with pytest.raises(ValueError, match=r"unknown `form` 'soft'; `form` must be one of 'tempered', 'reference'"):
        build_distiller({"name": "virtual_teacher", "form": "soft"})


# ---- make_self_teacher ---------------------------------------------------------------------------------------------
def teacher_args(output_dir, **overrides) -> TrainingArguments:
    return TrainingArguments(**{"output_dir": str(output_dir), "report_to": [], "use_cpu": True, "disable_tqdm": True,
                                "save_strategy": "no", "max_steps": 2, "per_device_train_batch_size": 4,
                                "learning_rate": 1e-2, **overrides})


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# Fields a training run or a save writes into a config; everything else describes the architecture.
WRITTEN_BY_TRAINING = {"dtype", "problem_type", "use_cache", "architectures", "_name_or_path"}


def architecture(config) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in WRITTEN_BY_TRAINING}


def test_self_teacher_is_the_students_architecture_trained_frozen_and_reloaded(tmp_path, monkeypatch):
    student, data = bert(seed=1), text_classification_data(n=8)
    initial = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher = make_self_teacher(student, teacher_args(tmp_path / "teacher"), data)
    assert type(teacher) is type(student) and architecture(teacher.config) == architecture(student.config)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(p, initial[n]) for n, p in student.named_parameters())  # the student is untouched
    changed = [n for n, p in teacher.named_parameters() if not torch.equal(p, initial[n])]
    assert len(changed) == len(initial)  # init="student": trained away from the student's weights

    def no_training(*args, **kwargs):
        raise AssertionError("a saved self-teacher must be reloaded, not retrained")

    monkeypatch.setattr(hf_kd.self_teacher, "Trainer", no_training)
    again = make_self_teacher(student, teacher_args(tmp_path / "teacher"), data)
    assert not again.training and not any(p.requires_grad for p in again.parameters())
    batch = collate(data)
    torch.testing.assert_close(logits_of(again, batch), logits_of(teacher, batch), rtol=0, atol=0)


def test_scratch_self_teacher_is_a_fresh_init_under_the_seed(tmp_path):
    student, data = bert(seed=1), text_classification_data(n=8)
    untrained = teacher_args(tmp_path / "a", learning_rate=0.0, seed=7)
    first = make_self_teacher(student, untrained, data, init="scratch")
    second = make_self_teacher(student, teacher_args(tmp_path / "b", learning_rate=0.0, seed=7), data, init="scratch")
    other_seed = make_self_teacher(student, teacher_args(tmp_path / "c", learning_rate=0.0, seed=8), data,
                                   init="scratch")
    weights = "bert.encoder.layer.0.attention.self.query.weight"
    parameters = [dict(m.named_parameters())[weights] for m in (first, second, other_seed, student)]
    assert torch.equal(parameters[0], parameters[1])
    assert not torch.equal(parameters[0], parameters[2]) and not torch.equal(parameters[0], parameters[3])
    with pytest.raises(ValueError, match="unknown `init` 'copy'"):
        make_self_teacher(student, untrained, data, init="copy")
    with pytest.raises(TypeError, match="copies a transformers PreTrainedModel; got Linear"):
        make_self_teacher(torch.nn.Linear(2, 2), untrained, data)


def test_distilling_from_a_self_teacher_with_rectify_trains_with_finite_losses(tmp_path):
    data = text_classification_data(n=8)
    teacher = make_self_teacher(bert(seed=1), teacher_args(tmp_path / "teacher"), data)
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=teacher,
        args=training_args(tmp_path / "student", max_steps=2, logging_steps=1),
        train_dataset=data, distillers=[{"name": "kl", "rectify": True, "temperature": 2.0}],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss/kl" in entry]
    assert len(logs) == 2 and all(math.isfinite(e["loss/kl"]) and math.isfinite(e["loss/hard"]) for e in logs)

"""Teacher-free KD: DR-KD's rectified teacher (``rectify=True`` on every logit distiller)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import llama, lm_data, training_args
from hf_kd import DistillationTrainer, ModelView, build_distiller
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
        student.train()
        loss = trainer.compute_loss(student, dict(batch))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-6, rtol=1e-4)

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



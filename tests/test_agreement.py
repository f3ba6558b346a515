"""Distillation-aware evaluation: ``eval_teacher_agreement`` (top-1 agreement) and ``eval_kl_to_teacher``
(KL(p_teacher || p_student) at temperature 1), means over every evaluated row, from the teacher pass evaluation
already makes."""

from __future__ import annotations

import pytest
import torch

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer, ModelView
from hf_kd.agreement import agreement_per_sample, kl_to_teacher, top1_agreement

pytestmark = pytest.mark.usefixtures("one_thread")


def kl_by_hand(s, t):
    p = t.softmax(-1)
    return (p * (p.log() - s.log_softmax(-1))).sum(-1)


def test_classifier_agreement_and_kl_by_hand():
    s = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    t = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [4.0, 1.0, 0.0]])  # rows 0 and 2 agree
    assert top1_agreement(s, t).tolist() == [1.0, 0.0, 1.0, 0.0]
    torch.testing.assert_close(kl_to_teacher(s, t), kl_by_hand(s, t))
    views = [ModelView(None, "classification", logits=logits) for logits in (s, t)]
    samples = agreement_per_sample(*views, {"labels": torch.zeros(4, dtype=torch.long)})
    expected = torch.stack([top1_agreement(s, t), kl_by_hand(s, t), torch.ones(4)], dim=-1)  # one row per sample
    torch.testing.assert_close(samples, expected)


def test_causal_lm_agreement_is_per_predicted_token_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, -100, -100]])
    valid = labels[:, 1:] != -100  # position i predicts token i + 1
    rows_s, rows_t = s[:, :-1][valid], t[:, :-1][valid]
    samples = agreement_per_sample(ModelView(None, "causal_lm", logits=s), ModelView(None, "causal_lm", logits=t),
                                   {"labels": labels}, chunk_size=3)  # a chunk spans both samples
    agree, kl = (rows_s.argmax(-1) == rows_t.argmax(-1)).float(), kl_by_hand(rows_s, rows_t)
    first = slice(0, 4)  # sample 0 predicts 4 tokens, sample 1 the next 2
    expected = torch.tensor([[agree[first].sum(), kl[first].sum(), 4.0], [agree[4:].sum(), kl[4:].sum(), 2.0]])
    torch.testing.assert_close(samples, expected)


def test_the_fused_head_view_gives_what_the_logits_give():
    student, teacher = llama(seed=1).eval(), llama(layers=3, seed=2).eval()
    batch = lm_data(n=4).with_format("torch")[:]
    views = []
    for fused in (False, True):
        pair = []
        for model in (student, teacher):
            with torch.no_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True)
            head = model.get_output_embeddings()
            pair.append(ModelView(model, "causal_lm", head_input=out.hidden_states[-1], head=head) if fused
                        else ModelView(model, "causal_lm", logits=out.logits))
        views.append(agreement_per_sample(*pair, batch, chunk_size=5))
    torch.testing.assert_close(views[0], views[1], rtol=1e-5, atol=1e-5)


def build(tmp_path, family="classifier", n=7, **overrides):
    if family == "classifier":
        student, teacher, data = bert(seed=1), bert(layers=3, seed=2), text_classification_data(n=n)
    else:
        student, teacher, data = llama(seed=1), llama(layers=3, seed=2), lm_data(n=n)
    calls = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(1))
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, eval_dataset=data, distillers=[{"name": "kl", "temperature": 2.0}],
        args=training_args(tmp_path, per_device_eval_batch_size=3, **overrides),
    )
    return trainer, data, calls


def by_hand(student, teacher, data, family):
    """Agreement and KL over every row of the whole set at once (no batching)."""
    batch = data.with_format("torch")[:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        s, t = student.eval()(**inputs).logits, teacher.eval()(**inputs).logits
    if family == "causal_lm":
        valid = batch["labels"][:, 1:] != -100
        s, t = s[:, :-1][valid], t[:, :-1][valid]
    return (s.argmax(-1) == t.argmax(-1)).float().mean().item(), kl_by_hand(s, t).mean().item()


@pytest.mark.parametrize("family", ["classifier", "causal_lm"])
def test_evaluate_reports_row_weighted_means_over_the_whole_set_with_one_teacher_pass_per_batch(tmp_path, family):
    trainer, data, calls = build(tmp_path, family, n=7)  # batches of 3, 3, 1; LM rows per batch differ (padding)
    metrics = trainer.evaluate()
    assert len(calls) == 3, "one teacher forward per eval batch, no second pass"
    agree, kl = by_hand(trainer.model, trainer.teacher, data, family)
    assert metrics["eval_teacher_agreement"] == pytest.approx(agree, abs=1e-6)
    assert metrics["eval_kl_to_teacher"] == pytest.approx(kl, rel=1e-3, abs=1e-7)  # fp32, tiny KL
    assert "test_teacher_agreement" in trainer.evaluate(metric_key_prefix="test")


def test_the_fused_lm_path_reports_what_the_plain_one_does(tmp_path):
    fused = build(tmp_path / "fused", "causal_lm")[0].evaluate()
    plain = build(tmp_path / "plain", "causal_lm", fused_lm_loss=False)[0].evaluate()
    for key in ("eval_teacher_agreement", "eval_kl_to_teacher"):
        assert fused[key] == pytest.approx(plain[key], rel=1e-5)


@pytest.mark.parametrize("overrides, runs_teacher", [({"eval_distillation_losses": False}, False),
                                                     ({"eval_teacher_agreement": False}, True)])
def test_the_metrics_are_absent_when_switched_off(tmp_path, overrides, runs_teacher):
    trainer, _, calls = build(tmp_path, **overrides)
    metrics = trainer.evaluate()
    assert "eval_teacher_agreement" not in metrics and "eval_kl_to_teacher" not in metrics
    assert bool(calls) == runs_teacher

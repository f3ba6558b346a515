"""teacher_aggregation: every policy by hand on small tensors, identical teachers give the single-teacher loss, the
fused causal-LM path with two teachers equals the unfused one, learned weights train, and errors come before
training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bert, llama, lm_data, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.teacher_aggregation import TeacherAggregation, list_teacher_aggregations

T = 2.0
MIXTURES = [p for p in list_teacher_aggregations() if p != "rank_fusion"]
OPTIONS = {"weighted": {"weights": [3.0, 1.0]}, "confidence": {"measure": "true_class"}}


def policy(name: str, **options) -> TeacherAggregation:
    aggregation = TeacherAggregation(name, **{**OPTIONS.get(name, {}), **options})
    aggregation.setup(2)
    return aggregation


def logits_pair():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 4, generator=g) * 2, torch.randn(5, 4, generator=g) * 2, torch.tensor([0, 1, 2, 3, 1])


def target(aggregation, teachers, targets):
    return (aggregation(teachers, targets, T) / T).softmax(-1)


def mixture(teachers, weights):
    """``sum_k w_k softmax(z_k / T)`` with per-row weights ``[n, K]``."""
    return sum(weights[:, k : k + 1] * (z / T).softmax(-1) for k, z in enumerate(teachers))


def test_mean_weighted_and_learned_at_start_are_the_fixed_mixtures():
    a, b, y = logits_pair()
    half = torch.full((5, 2), 0.5)
    torch.testing.assert_close(target(policy("mean"), [a, b], y), mixture([a, b], half))
    torch.testing.assert_close(target(policy("learned"), [a, b], y), mixture([a, b], half))  # a = 0: equal weights
    torch.testing.assert_close(target(policy("weighted"), [a, b], y),
                               mixture([a, b], torch.tensor([[0.75, 0.25]]).expand(5, -1)))


def test_confidence_weights_by_entropy_or_by_the_true_class_probability():
    a, b, y = logits_pair()
    p = [(z / T).softmax(-1) for z in (a, b)]
    entropy = torch.stack([-(q * q.log()).sum(-1) for q in p], 1)
    torch.testing.assert_close(target(policy("confidence", measure="entropy"), [a, b], y),
                               mixture([a, b], (-entropy).softmax(-1)))
    true = torch.stack([q[torch.arange(5), y] for q in p], 1)
    torch.testing.assert_close(target(policy("confidence"), [a, b], y), mixture([a, b], true / true.sum(1, True)))


def test_vote_averages_the_teachers_that_voted_for_the_winner_and_best_takes_the_surest_on_the_truth():
    a = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    c = torch.tensor([[0.0, 4.0, 0.0], [0.0, 0.0, 3.0]])
    aggregation = TeacherAggregation("vote")
    aggregation.setup(3)
    # row 0: a, b vote class 0 (2 votes) -> mean of a, b; row 1: b, c vote class 2 -> mean of b, c
    expected = mixture([a, b, c], torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    torch.testing.assert_close(target(aggregation, [a, b, c], None), expected)
    weighted = TeacherAggregation("vote", weights=[1.0, 0.3, 0.3])  # KEnS' default weights: row 1: c (0.3) vs a (1)
    weighted.setup(3)
    torch.testing.assert_close(target(weighted, [a, b, c], None)[1], (a[1] / T).softmax(-1))
    best = TeacherAggregation("best")
    best.setup(3)
    y = torch.tensor([1, 2])  # row 0: c is surest on class 1; row 1: c on class 2
    torch.testing.assert_close(target(best, [a, b, c], y), (c / T).softmax(-1))


def test_rank_fusion_scores_classes_by_reciprocal_rank():
    a = torch.tensor([[3.0, 2.0, 1.0]])
    b = torch.tensor([[1.0, 3.0, 2.0]])
    aggregation = TeacherAggregation("rank_fusion", weights=[1.0, 0.5], constant=2.0)
    aggregation.setup(2)
    scores = torch.tensor([[1 / 3 + 0.5 / 5, 1 / 4 + 0.5 / 3, 1 / 5 + 0.5 / 4]])  # ranks: a 1,2,3; b 3,1,2
    torch.testing.assert_close(target(aggregation, [a, b], None), scores / scores.sum())


@pytest.mark.parametrize("name", list_teacher_aggregations())
def test_two_identical_teachers_aggregate_as_one(name):
    a, _, y = logits_pair()
    one = TeacherAggregation(name, **({"weights": [1.0]} if name == "weighted" else {}))
    one.setup(1)
    two = policy(name)
    torch.testing.assert_close(two([a, a], y, T), one([a], y, T))
    if name != "rank_fusion":  # a mixture of one teacher is that teacher, logits included (offset)
        torch.testing.assert_close(one([a], y, T), a)


def make_trainer(output_dir, teachers, distillers, family="text", **overrides):
    student, data = (bert(seed=1, hidden=16), text_classification_data(n=8)) if family == "text" else \
        (llama(seed=1), lm_data(n=8))
    args = DistillationArguments(**{
        "output_dir": str(output_dir), "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "seed": 0, **overrides})
    return DistillationTrainer(model=student, teacher_model=teachers, args=args, distillers=distillers,
                               train_dataset=data)


def sharp(model, factor: float = 30.0):
    """``model`` with its output head scaled: random tiny models are near-uniform, and the losses against them tiny."""
    head = model.get_output_embeddings() if hasattr(model, "lm_head") else model.classifier
    with torch.no_grad():
        head.weight.mul_(factor)
    return model


def losses(trainer):
    trainer.train()
    history = trainer.state.log_history
    return [{k: v for k, v in log.items() if k.startswith("loss")} for log in history if "loss" in log]


def distiller_spec(name, policy_name, family):
    options = OPTIONS.get(policy_name, {})
    if policy_name == "weighted":
        options = {"weights": [3.0, 1.0]}
    return {"name": name, "temperature": T, "teacher_aggregation": {"policy": policy_name, **options},
            **({"temperature": 1.0} if name == "mse" else {})}


@pytest.mark.parametrize("family", ["text", "lm"])
@pytest.mark.parametrize("policy_name", list_teacher_aggregations())
def test_two_copies_of_a_teacher_train_as_that_teacher_alone(policy_name, family, tmp_path, one_thread):
    """Every policy over [t, t] trains exactly as over [t] (mixtures: as the plain single-teacher kl)."""
    teacher = sharp(bert(seed=2, layers=3, hidden=24) if family == "text" else llama(seed=2, layers=3, hidden=48))
    spec = distiller_spec("kl", policy_name, family)
    single = dict(spec, teacher_aggregation={**spec["teacher_aggregation"], **(
        {"weights": [1.0]} if "weights" in spec["teacher_aggregation"] else {})})
    if policy_name != "rank_fusion":
        single = {"name": "kl", "temperature": T}
    copy = type(teacher)(teacher.config)
    copy.load_state_dict(teacher.state_dict())
    got = losses(make_trainer(tmp_path / "two", [teacher, copy], [spec], family))
    want = losses(make_trainer(tmp_path / "one", [teacher], [single], family))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4)  # float32: a KL of ~1e-3 from terms of ~1


@pytest.mark.parametrize("name", ["kl", "mse", "jsd", "dkd"])
def test_every_logit_distiller_takes_the_option(name, tmp_path, one_thread):
    teachers = [llama(seed=2, layers=3, hidden=48), llama(seed=3, layers=2, hidden=40)]
    spec = {"name": name, "teacher_aggregation": "mean"}
    assert build_distiller(spec).multi_teacher
    logs = losses(make_trainer(tmp_path, teachers, [spec], "lm"))
    assert all(torch.isfinite(torch.tensor(log[f"loss/{name}"])) and log[f"loss/{name}"] > 0 for log in logs)


def test_the_fused_lm_path_with_two_teachers_equals_the_unfused_one(tmp_path, one_thread):
    teachers = [sharp(llama(seed=2, layers=3, hidden=48)), sharp(llama(seed=3, layers=2, hidden=40))]
    spec = {"name": "kl", "temperature": T, "teacher_aggregation": "confidence"}
    fused = make_trainer(tmp_path / "f", teachers, [spec], "lm", fused_lm_loss=True, loss_chunk_size=5)
    plain = make_trainer(tmp_path / "p", teachers, [spec], "lm", fused_lm_loss=False)
    got, want = losses(fused), losses(plain)
    assert fused._fused_lm and not plain._fused_lm  # the comparison is of the two paths
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-5)
    for (name, p), q in zip(fused.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [None, 5])
def test_learned_weights_train_with_the_student_in_both_row_paths(chunk, tmp_path, one_thread):
    teachers = [llama(seed=2, layers=3, hidden=48), llama(seed=3, layers=2, hidden=40)]
    trainer = make_trainer(tmp_path, teachers, [{"name": "kl", "teacher_aggregation": "learned"}], "lm",
                           loss_chunk_size=chunk, learning_rate=0.1)
    weights = trainer.distillers[0].aggregation.logits
    assert weights.tolist() == [0.0, 0.0]
    trainer.train()
    assert weights.abs().sum() > 0, "the learned teacher weights must receive gradients"
    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert not any("aggregation" in key for key in saved)


def test_the_learned_gradient_equals_autograd_through_the_mixture():
    """The chunked row pass hands the learned weights the gradient plain autograd gives."""
    from hf_kd.row_loss import LogitSource, RowTerm, row_losses

    g = torch.Generator().manual_seed(1)
    s, a, b = (torch.randn(7, 6, generator=g) for _ in range(3))
    s.requires_grad_()
    distiller = build_distiller({"name": "kl", "teacher_aggregation": "learned", "temperature": T})
    distiller.setup(None, [None, None])
    with torch.no_grad():
        distiller.aggregation.logits.copy_(torch.tensor([0.3, -0.2]))
    term = [RowTerm("kl", distiller.row_loss, 1.0, tuple(distiller.parameters()))]
    rows = torch.arange(7)
    total, _ = row_losses(term, LogitSource(s), [LogitSource(a), LogitSource(b)], rows, None, 6, 7.0, chunk_size=3)
    total.backward()
    chunked = distiller.aggregation.logits.grad.clone(), s.grad.clone()
    distiller.aggregation.logits.grad, s.grad = None, None
    distiller.row_loss(s, [a, b], None).mean().backward()
    torch.testing.assert_close(chunked[0], distiller.aggregation.logits.grad)
    torch.testing.assert_close(chunked[1], s.grad)


def test_kl_over_the_mean_of_two_teachers_by_hand(tmp_path):
    teachers = [sharp(bert(seed=2, layers=3, hidden=24)), sharp(bert(seed=3, layers=2, hidden=32))]
    trainer = make_trainer(tmp_path, teachers, [{"name": "kl", "temperature": T, "teacher_aggregation": "mean"}])
    data = text_classification_data(n=6, seed=5)
    inputs = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    student = trainer.model.eval()
    with torch.no_grad():
        trainer.compute_loss(student, dict(inputs))
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        z_s, z_0, z_1 = (m(**model_inputs).logits for m in (student, *teachers))
    p = ((z_0 / T).softmax(-1) + (z_1 / T).softmax(-1)) / 2
    expected = F.kl_div(F.log_softmax(z_s / T, -1), p, reduction="batchmean") * T * T
    assert trainer.ledger.pop_eval(lambda v: v.reshape(1))["kl"] == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("spec, fragment", [
    ({"teacher_aggregation": "majority"}, "Unknown teacher_aggregation policy 'majority'"),
    ({"teacher_aggregation": {"policy": "weighted"}}, "needs `weights`"),
    ({"teacher_aggregation": {"policy": "weighted", "weights": [1, -1]}}, "must be positive"),
    ({"teacher_aggregation": {"weights": [1, 2]}}, "a policy name or a dict"),
])
def test_bad_aggregation_options_are_refused_when_built(spec, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        build_distiller({"name": "kl", **spec})


def test_weights_that_do_not_match_the_teachers_are_refused_before_training(tmp_path):
    spec = {"name": "kl", "teacher_aggregation": {"policy": "weighted", "weights": [1, 2, 3]}}
    with pytest.raises(ValueError, match="has 3 entries but `teacher_model` has 2 teachers"):
        make_trainer(tmp_path, [bert(seed=2), bert(seed=3)], [spec])


def test_best_declares_that_it_needs_labels():
    assert build_distiller({"name": "kl", "teacher_aggregation": "best"}).requires.labels
    assert not build_distiller({"name": "kl", "teacher_aggregation": "mean"}).requires.labels


def test_rectify_applies_to_the_aggregated_target():
    """DR-KD after aggregation: the swap is made on the mixture's logits, where the mixture's top class is wrong."""
    from hf_kd.distillers.divergences import rectified, tempered_kl

    a, b, y = logits_pair()
    distiller = build_distiller({"name": "kl", "temperature": T, "teacher_aggregation": "mean", "rectify": True})
    distiller.setup(None, [None, None])
    s = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    mixed = distiller.aggregation([a, b], y, T)
    assert (mixed.argmax(-1) != y).any() and (mixed.argmax(-1) == y).any()
    torch.testing.assert_close(distiller.row_loss(s, [a, b], y), tempered_kl(s, rectified(mixed, y), T))
    assert distiller.requires.labels

"""Several teachers: each distiller reads the teacher at its index (or all of them), only read teachers run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import bert, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer
from hf_kd.trainer import OBJECTIVE


def make_trainer(output_dir, teachers, distillers, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 6, "max_steps": 2, **overrides})
    return DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=teachers, args=args,
                               distillers=distillers, train_dataset=text_classification_data())


def batch():
    data = text_classification_data(n=6, seed=5)
    return {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}


def kl_by_hand(student_logits, teacher_logits, t):
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


def test_each_distiller_reads_its_teacher(output_dir):
    teachers = [bert(seed=2, layers=3, hidden=32), bert(seed=3, layers=2, hidden=24)]
    trainer = make_trainer(output_dir, teachers, [{"name": "kl", "temperature": 2.0},
                                                 {"name": "kl", "temperature": 3.0, "teacher": 1}])
    assert trainer.teachers == teachers and trainer.teacher is teachers[0]
    inputs = batch()
    student = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, dict(inputs))
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        z_s, z_0, z_1 = (m(**model_inputs).logits for m in (student, *teachers))
    values = trainer.ledger.pop_eval(lambda v: v.reshape(1))
    assert values["kl"] == pytest.approx(kl_by_hand(z_s, z_0, 2.0).item(), rel=1e-5)
    assert values["kl_2"] == pytest.approx(kl_by_hand(z_s, z_1, 3.0).item(), rel=1e-5)
    hard = F.cross_entropy(z_s, inputs["labels"]).item()
    assert values[OBJECTIVE] == pytest.approx(hard + values["kl"] + values["kl_2"], rel=1e-5)
    assert loss.item() == pytest.approx(hard, rel=1e-5)  # evaluation returns the student's own loss


def test_gradients_of_both_row_passes_reach_the_student(output_dir):
    teachers = [bert(seed=2, hidden=32), bert(seed=3, hidden=24)]
    trainer = make_trainer(output_dir, teachers, [{"name": "kl"}, {"name": "kl", "teacher": 1}],
                           hard_label_weight=0.0)
    student = trainer.model.train()
    trainer.compute_loss(student, batch()).backward()
    grad = student.classifier.weight.grad.clone()
    for param in student.parameters():
        param.grad = None
    single = make_trainer(output_dir, teachers[:1], [{"name": "kl"}], hard_label_weight=0.0)
    single.model.load_state_dict(student.state_dict())
    single.compute_loss(single.model.train(), batch()).backward()
    assert not torch.allclose(grad, single.model.classifier.weight.grad)  # teacher 1's pass adds its own gradient


def test_a_teacher_no_distiller_reads_never_runs(output_dir):
    teachers = [bert(seed=2), bert(seed=3)]
    calls = []
    teachers[1].register_forward_hook(lambda *a: calls.append(1))
    trainer = make_trainer(output_dir, teachers, [{"name": "kl"}])
    trainer.train()
    assert calls == []


def test_teacher_index_errors(output_dir):
    teachers = [bert(seed=2), bert(seed=3)]
    with pytest.raises(ValueError, match=r"reads teacher 2 .*has 2 teacher\(s\); use an index below 2"):
        make_trainer(output_dir, teachers, [{"name": "kl", "teacher": 2}])
    with pytest.raises(ValueError, match="`teacher` is the position"):
        make_trainer(output_dir, teachers, [{"name": "kl", "teacher": "first"}])
    with pytest.raises(ValueError, match="reads every teacher; remove its `teacher` option"):
        make_trainer(output_dir, teachers, [{"name": "atsc", "teacher": 1}])
    with pytest.raises(TypeError, match="non-empty list of models"):
        make_trainer(output_dir, [], [{"name": "kl"}])


def test_every_teacher_is_evaluated(output_dir):
    teachers = [bert(seed=2), bert(seed=3)]
    data = text_classification_data(n=6, seed=5)

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = make_trainer(output_dir, teachers, [{"name": "kl"}], teacher_eval_metrics=True)
    trainer.compute_metrics = accuracy
    metrics = trainer.evaluate(data)
    inputs = batch()
    for index, teacher in enumerate(teachers):
        with torch.no_grad():
            logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        expected = (logits.argmax(-1) == inputs["labels"]).float().mean().item()
        assert metrics[f"eval_teacher{index}_accuracy"] == pytest.approx(expected)
    assert "eval_teacher_accuracy" not in metrics


# ---- teacher: "all": one copy (one projector) per teacher ------------------------------------------------------
def projector_weights(distiller):
    return distiller.projectors["shared"].weight


def test_each_teacher_has_its_own_projector_and_the_loss_is_the_mean(output_dir):
    """Teachers 32 and 24 wide: `hidden_states` with teacher "all" holds a 16->32 and a 16->24 projector, and its
    loss is the mean of two single-teacher `hidden_states` with those projectors (half weight each)."""
    teachers = [bert(seed=2, layers=3, hidden=32), bert(seed=3, layers=2, hidden=24)]
    spec = {"name": "hidden_states", "weight": 2.0}
    each = make_trainer(output_dir, teachers, [{**spec, "teacher": "all"}])
    [distiller] = each.distillers
    assert distiller.name == "hidden_states" and each.distiller_keys == ["hidden_states"]
    copies = distiller.components
    assert [tuple(projector_weights(c).shape) for c in copies.values()] == [(32, 16), (24, 16)]
    assert [c.pairs() for c in copies.values()] == [[(1, 1), (2, 3)], [(1, 1), (2, 2)]]  # each teacher's depth
    apart = make_trainer(output_dir, teachers, [{**spec, "weight": 1.0, "teacher": 0},
                                                {**spec, "weight": 1.0, "teacher": 1}])
    apart.model.load_state_dict(each.model.state_dict())
    for single, copy in zip(apart.distillers, copies.values()):
        single.load_state_dict(copy.state_dict())
    values = {}
    for name, trainer in (("each", each), ("apart", apart)):
        trainer.model.eval()
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch())
        values[name] = trainer.ledger.pop_eval(lambda v: v.reshape(1))
    first, second = values["apart"]["hidden_states"], values["apart"]["hidden_states_2"]
    assert values["each"]["hidden_states/teacher0"] == pytest.approx(first, rel=1e-6)
    assert values["each"]["hidden_states/teacher1"] == pytest.approx(second, rel=1e-6)
    assert values["each"]["hidden_states"] == pytest.approx((first + second) / 2, rel=1e-6)
    assert values["each"][OBJECTIVE] == pytest.approx(values["apart"][OBJECTIVE], rel=1e-6)  # 2 * mean = sum


def test_each_teacher_trains_both_projectors_and_no_teacher(output_dir):
    teachers = [bert(seed=2, hidden=32), bert(seed=3, hidden=24)]
    trainer = make_trainer(output_dir, teachers, [{"name": "hidden_states", "teacher": "all"}],
                           hard_label_weight=0.0)
    trainer.compute_loss(trainer.model.train(), batch()).backward()
    for copy in trainer.distillers[0].components.values():
        assert projector_weights(copy).grad.abs().sum() > 0
    assert trainer.model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert all(p.grad is None for t in teachers for p in t.parameters())
    before = [projector_weights(c).detach().clone() for c in trainer.distillers[0].components.values()]
    trainer.train()  # the copies made in setup are in the optimizer
    after = [projector_weights(c) for c in trainer.distillers[0].components.values()]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))


def test_a_teacher_of_other_classes_serves_representation_distillers_only(output_dir):
    """Logit distillers refuse a teacher whose logits cannot be paired with the student's (sizes named); a
    representation distiller over every teacher still reads it."""
    teachers = [bert(seed=2, hidden=32), bert(seed=3, hidden=24, num_labels=5)]
    with pytest.raises(ValueError, match=r"\b5\b.*\b3\b|\b3\b.*\b5\b"):
        make_trainer(output_dir, teachers, [{"name": "kl", "teacher_aggregation": "mean"}])
    with pytest.raises(ValueError, match=r"\b5\b.*\b3\b|\b3\b.*\b5\b"):
        make_trainer(output_dir, teachers, [{"name": "kl", "teacher": "all"}])
    trainer = make_trainer(output_dir, teachers, [{"name": "kl"}, {"name": "hidden_states", "teacher": "all"}])
    trainer.train()
    assert trainer.state.global_step == 2


def test_each_teacher_errors():
    from hf_kd.distillers import build_distiller

    with pytest.raises(ValueError, match="reads every teacher; remove its `teacher` option"):
        build_distiller({"name": "atsc", "teacher": "all"})
    with pytest.raises(ValueError, match="reads no teacher; remove its `teacher` option"):
        build_distiller({"name": "virtual_teacher", "teacher": "all"})
    with pytest.raises(ValueError, match=r'or "all" for one copy per teacher; got \'every\''):
        build_distiller({"name": "kl", "teacher": "every"})


def two_teacher_run(output_dir, resume=None):
    teachers = [bert(seed=2, layers=3, hidden=32), bert(seed=3, hidden=24)]
    trainer = make_trainer(output_dir, teachers, [{"name": "kl", "teacher_aggregation": "learned"},
                                                 {"name": "hidden_states", "teacher": "all"}],
                           max_steps=4, logging_steps=1, save_strategy="steps", save_steps=1, seed=0,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2)
    trainer.train(resume_from_checkpoint=resume)
    losses = {log["step"]: {k: v for k, v in log.items() if k.startswith("loss")}
              for log in trainer.state.log_history if "loss" in log}
    return trainer, losses


def test_a_two_teacher_run_resumes_with_identical_losses(tmp_path):
    """Learned teacher weights and per-teacher projectors are checkpointed: the run resumed from its step-2
    checkpoint logs the losses of steps 3-4 and ends with the state of the run straight through."""
    straight, straight_losses = two_teacher_run(str(tmp_path / "straight"))
    two_teacher_run(str(tmp_path / "resumed"))
    resumed, resumed_losses = two_teacher_run(str(tmp_path / "resumed"),
                                              resume=str(tmp_path / "resumed" / "checkpoint-2"))
    learned = straight.distillers[0].aggregation.logits
    assert not torch.equal(learned, torch.zeros_like(learned))  # the teacher weights did train
    for step in (3, 4):
        assert resumed_losses[step].keys() == straight_losses[step].keys()
        for key, value in straight_losses[step].items():
            assert resumed_losses[step][key] == pytest.approx(value, rel=1e-5), (step, key)
    for group in ("model", "distillers"):
        expected, got = (getattr(t, group).state_dict() for t in (straight, resumed))
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{group} {key}")

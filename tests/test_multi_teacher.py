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

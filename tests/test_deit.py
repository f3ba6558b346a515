"""The ``deit`` distiller (DeiT's distillation token): the loss by hand, gradients to both heads, the export."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoModelForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTForImageClassification,
)

from conftest import deit, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.capture import ModelView

CLASSES = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def deit_student(seed: int = 0) -> DeiTForImageClassificationWithTeacher:
    return deit(num_labels=CLASSES, seed=seed)


def vit_teacher(seed: int = 1) -> ViTForImageClassification:
    return vit(num_labels=CLASSES, layers=2, hidden=16, patch_size=4, seed=seed)


def views(distiller, cls_logits, distillation_logits, teacher_logits):
    """Student/teacher views holding the given head outputs, as the trainer's hooks would capture them."""
    student = ModelView(model=torch.nn.Identity(), task="other",
                        features={distiller.cls_spec: cls_logits, distiller.distillation_spec: distillation_logits})
    teacher = ModelView(model=torch.nn.Identity(), task="classification", logits=teacher_logits)
    return student, teacher


# Two samples, three classes.
CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
DIST = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
TEACHER = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])  # argmax 1, 0
LABELS = torch.tensor([0, 1])


def cross_entropy(logits: torch.Tensor, targets: list[int]) -> float:
    """Mean over rows of -log softmax(logits)[target], written out."""
    rows = logits.tolist()
    return sum(math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(rows, targets)) / len(targets)


def test_hard_loss_matches_hand_computation():
    distiller = build_distiller({"name": "deit", "distillation_type": "hard"})
    loss, parts = distiller(*views(distiller, CLS, DIST, TEACHER), {"labels": LABELS})
    expected = 0.5 * cross_entropy(CLS, [0, 1]) + 0.5 * cross_entropy(DIST, [1, 0])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts["cls"].item() == pytest.approx(cross_entropy(CLS, [0, 1]), rel=1e-6)
    assert parts["distillation"].item() == pytest.approx(cross_entropy(DIST, [1, 0]), rel=1e-6)


def test_soft_loss_matches_hand_computation():
    tau, alpha = 3.0, 0.1
    distiller = build_distiller({"name": "deit", "distillation_type": "soft", "alpha": alpha, "temperature": tau})
    loss, _ = distiller(*views(distiller, CLS, DIST, TEACHER), {"labels": LABELS})
    kl = 0.0
    for student_row, teacher_row in zip(DIST.tolist(), TEACHER.tolist()):
        p_t = [math.exp(v / tau) for v in teacher_row]
        p_s = [math.exp(v / tau) for v in student_row]
        p_t, p_s = [v / sum(p_t) for v in p_t], [v / sum(p_s) for v in p_s]
        kl += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = (1 - alpha) * cross_entropy(CLS, [0, 1]) + alpha * tau**2 * kl / 2  # batchmean
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_options_are_checked():
    with pytest.raises(ValueError, match="`distillation_type` must be one of"):
        build_distiller({"name": "deit", "distillation_type": "medium"})
    with pytest.raises(ValueError, match="`alpha` must be >= 0 and <= 1.0"):
        build_distiller({"name": "deit", "alpha": 1.5})


def test_setup_rejects_a_student_without_distillation_head():
    distiller = build_distiller({"name": "deit"})
    with pytest.raises(ValueError, match="DeiTForImageClassificationWithTeacher"):
        distiller.setup(vit_teacher(), vit_teacher())


def pixel_data(count: int = 8) -> Dataset:
    torch.manual_seed(2)
    return Dataset.from_dict({"pixel_values": torch.randn(count, 1, 8, 8).tolist(),
                              "labels": torch.randint(0, CLASSES, (count,)).tolist()}).with_format("torch")


def trainer_for(student, tmp_path, distillation_type: str = "hard", max_steps: int = 2) -> DistillationTrainer:
    args = DistillationArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-2, hard_label_weight=0.0, label_names=["labels"], report_to=[],
                                 save_strategy="no", disable_tqdm=True, use_cpu=True)
    return DistillationTrainer(model=student, teacher_model=vit_teacher(), args=args, train_dataset=pixel_data(),
                               distillers=[{"name": "deit", "distillation_type": distillation_type}])


@pytest.mark.parametrize("distillation_type", ["hard", "soft"])
def test_gradients_reach_both_heads(tmp_path, distillation_type):
    student = deit_student()
    trainer = trainer_for(student, tmp_path, distillation_type)
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    for head in (student.cls_classifier, student.distillation_classifier):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert student.deit.embeddings.distillation_token.grad.abs().sum() > 0


def test_exported_student_averages_the_two_heads(tmp_path):
    trainer = trainer_for(deit_student(), tmp_path)
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "student")).eval()
    assert type(reloaded) is DeiTForImageClassificationWithTeacher  # the Auto class keeps the architecture
    pixels = pixel_data()[:]["pixel_values"]
    trained = trainer.model.eval()
    with torch.no_grad():
        outputs, expected = reloaded(pixel_values=pixels), trained(pixel_values=pixels)
    assert torch.equal(outputs.logits, expected.logits)
    assert torch.allclose(outputs.logits, (outputs.cls_logits + outputs.distillation_logits) / 2)
    assert not torch.allclose(outputs.cls_logits, outputs.distillation_logits)


def test_deit_beside_kl_evaluates_through_the_trainer(tmp_path):
    """A DeiT student is a classifier to hf_kd (logit width checks, kl on its averaged logits), and evaluation works
    although its output class has no ``loss`` field."""
    student = deit_student()
    trainer = trainer_for(student, tmp_path)
    kl_trainer = DistillationTrainer(
        model=student, teacher_model=vit_teacher(), args=trainer.args, train_dataset=pixel_data(),
        eval_dataset=pixel_data(), distillers=[{"name": "deit"}, {"name": "kl", "weight": 0.5}])
    metrics = kl_trainer.evaluate()
    assert metrics["eval_distillation_loss"] == pytest.approx(metrics["eval_loss/deit"] + 0.5 * metrics["eval_loss/kl"],
                                                              rel=1e-5)
    predictions = kl_trainer.predict(pixel_data()).predictions
    with torch.no_grad():
        expected = student.eval()(pixel_values=pixel_data()[:]["pixel_values"]).logits
    torch.testing.assert_close(torch.as_tensor(predictions), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_labels"):
        DistillationTrainer(model=deit_student(), teacher_model=vit(num_labels=CLASSES + 1, layers=1, hidden=16,
                                                                    patch_size=4),
                            args=trainer.args, distillers=[{"name": "deit"}])

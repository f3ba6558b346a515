"""TeacherSlot: one teacher's state fixed when the trainer is built, and its forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import bert, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer
from hf_kd.capture import FeatureSpec
from hf_kd.distillers import FeatureDistiller, KLDistiller
from hf_kd.teachers import TeacherSlot

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = {"output_hidden_states": True, "output_attentions": True}


def make_trainer(output_dir, teachers, distillers, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "max_steps": 2, **overrides})
    return DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=teachers, args=args,
                               distillers=distillers, train_dataset=text_classification_data())


def batch(n: int = 6):
    data = text_classification_data(n=n, seed=5)
    return {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}


class CountingKL(KLDistiller):
    """KL whose ``requires`` counts how often it is read."""

    reads = 0

    @property
    def requires(self):
        CountingKL.reads += 1
        return KLDistiller.requires


def test_readers_are_computed_once_when_the_trainer_is_built(output_dir):
    first, second = CountingKL(), KLDistiller()
    second.teacher_index = 1
    CountingKL.reads = 0
    trainer = make_trainer(output_dir, [bert(seed=2), bert(seed=3)], [first, second])
    assert [slot.readers for slot in trainer._slots] == [(first,), (second,)]
    assert [slot.role for slot in trainer._slots] == ["teacher 0", "teacher 1"]
    built = CountingKL.reads
    assert built > 0
    student = trainer.model.train()
    losses = [trainer.compute_loss(student, batch()).item() for _ in range(3)]
    assert CountingKL.reads == built  # no step asks the distillers what they read again
    assert losses[0] == pytest.approx(losses[2], rel=1e-6)  # same batch, same weights: the same loss


def test_a_frozen_slots_view_holds_ordinary_tensors_usable_in_autograd():
    teacher = bert(seed=2, attn_implementation="eager").eval().requires_grad_(False)
    reader = FeatureDistiller("bert.encoder.layer.0.output", "bert.encoder.layer.1.output")
    slot = TeacherSlot.build(teacher, 0, 1, [reader], trained=(), student_device=torch.device("cpu"))
    assert slot.frozen and slot.runs and slot.role == "teacher" and slot.task == "classification"
    assert slot.features == (FeatureSpec("bert.encoder.layer.1.output"),)
    inputs = batch()
    view = slot.forward(inputs, FLAGS, fused=False, training=True)
    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.inference_mode():
        raw = teacher(**model_inputs, **FLAGS)
    weight = torch.ones(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        raw.logits * weight  # what distillers would get without the copies
    tensors = [view.logits, *view.hidden_states, *view.attentions, *view.features.values()]
    assert len(tensors) == 1 + 3 + 2 + 1
    assert not any(t.is_inference() or t.requires_grad for t in tensors)
    assert torch.equal(view.logits, raw.logits)
    assert all(torch.equal(a, b) for a, b in zip(view.hidden_states, raw.hidden_states))
    assert torch.equal(view.features[slot.features[0]], raw.hidden_states[2])  # layer 1's output
    (view.logits * weight).sum().backward()
    torch.testing.assert_close(weight.grad, view.logits.sum(0))


def test_a_slot_no_distiller_reads_does_not_run_and_a_read_one_runs_once_per_batch(output_dir):
    teachers = [bert(seed=2), bert(seed=3)]
    calls = [0, 0]
    for index, teacher in enumerate(teachers):
        teacher.register_forward_hook(lambda *a, index=index: calls.__setitem__(index, calls[index] + 1))
    trainer = make_trainer(output_dir, teachers, [{"name": "kl"}])
    assert [slot.runs for slot in trainer._slots] == [True, False]
    assert trainer._slots[1].readers == () and trainer._slots[1].features == ()
    student = trainer.model.train()
    for _ in range(3):
        trainer.compute_loss(student, batch())
    assert calls == [3, 0]


def test_a_teacher_a_distiller_trains_is_not_frozen_and_its_view_keeps_autograd(output_dir):
    trainer = make_trainer(output_dir, [bert(seed=2), bert(seed=3)],
                           [{"name": "kl"}, {"name": "dualde", "teacher": 1, "stage2_step": 0}])
    assert [slot.frozen for slot in trainer._slots] == [True, False]
    views = [slot.forward(batch(), {}, fused=False, training=True) for slot in trainer._slots]
    assert [view.logits.requires_grad for view in views] == [False, True]
    assert not any(view.logits.is_inference() for view in views)
    assert [slot.model is teacher for slot, teacher in zip(trainer._slots, trainer.teachers)] == [True, True]

"""distill_chain (TAKD): teacher -> assistant -> student as successive runs, each stage saved and reused."""

from __future__ import annotations

import math
import os
from typing import ClassVar

import pytest
import torch
from transformers import BertForSequenceClassification, TrainerCallback

from conftest import bert, text_classification_data, training_args
from hf_kd import Distiller, Requirements, distill_chain
from hf_kd.distillers.divergences import tempered_kl

pytestmark = pytest.mark.usefixtures("one_thread")


class TeacherRecorder(Distiller):
    """KL at T=1 that records the inputs and the teacher logits it reads (class-level: each stage gets a copy)."""

    requires = Requirements(logits=True)
    seen: ClassVar[list] = []

    def forward(self, student, teacher, batch):
        inputs = {k: batch[k].clone() for k in ("input_ids", "attention_mask")}
        TeacherRecorder.seen.append((inputs, teacher.logits.clone()))
        return tempered_kl(student.logits.float(), teacher.logits.float(), 1.0).mean()


class GuidesRecorder(Distiller):
    """The mean KL at T=1 against every teacher, recording the inputs and each teacher's logits."""

    requires = Requirements(logits=True)
    multi_teacher = True
    seen: ClassVar[list] = []

    def forward(self, student, teachers, batch):
        inputs = {k: batch[k].clone() for k in ("input_ids", "attention_mask")}
        GuidesRecorder.seen.append((inputs, [t.logits.clone() for t in teachers]))
        return sum(tempered_kl(student.logits.float(), t.logits.float(), 1.0).mean() for t in teachers) / len(teachers)


class Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.logs.append((os.path.basename(args.output_dir), logs))


def logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_a_two_stage_chain_distils_each_stage_from_the_previous_and_reuses_saved_stages(output_dir):
    TeacherRecorder.seen.clear()
    teacher = bert(seed=2, layers=3, hidden=48)
    args = training_args(output_dir, max_steps=2, logging_steps=1, learning_rate=1e-2)
    data = text_classification_data()
    callback = Logs()
    assistant, student = bert(seed=3, hidden=32), bert(seed=4, hidden=16)
    initial = [p.detach().clone() for p in student.parameters()]
    trained = distill_chain([assistant, student], teacher, args, data,
                            distillers=[{"name": "kl", "temperature": 2.0}, TeacherRecorder()], callbacks=[callback])
    assert trained[0] is assistant and trained[1] is student
    assert any(not torch.equal(p, q) for p, q in zip(initial, student.parameters()))  # the student trained
    assert [stage for stage, _ in callback.logs] == ["stage_1", "stage_1", "stage_2", "stage_2"]
    assert all(math.isfinite(log[key]) for _, log in callback.logs for key in ("loss", "loss/kl", "loss/hard"))

    saved = [BertForSequenceClassification.from_pretrained(os.path.join(output_dir, f"stage_{i}")) for i in (1, 2)]
    assert len(TeacherRecorder.seen) == 4  # two steps per stage
    for (inputs, teacher_logits), reader in zip(TeacherRecorder.seen, [teacher, teacher, saved[0], saved[0]]):
        torch.testing.assert_close(teacher_logits, logits(reader, inputs))  # stage 2 reads stage 1's trained model
    probe = {k: torch.tensor(v) for k, v in data[:6].items() if k != "labels"}
    for model, reloaded in zip(trained, saved):  # a plain from_pretrained gives the trained model
        torch.testing.assert_close(logits(reloaded, probe), logits(model, probe), rtol=0, atol=0)

    again = distill_chain([bert(seed=5, hidden=32), bert(seed=6, hidden=16)], teacher, args, data,
                          distillers=[{"name": "kl", "temperature": 2.0}, TeacherRecorder()], callbacks=[callback])
    assert len(TeacherRecorder.seen) == 4 and len(callback.logs) == 4  # nothing trained again
    for model, first in zip(again, trained):
        torch.testing.assert_close(logits(model, probe), logits(first, probe), rtol=0, atol=0)


def test_guides_all_gives_each_stage_the_teacher_and_every_stage_before_it(output_dir):
    GuidesRecorder.seen.clear()
    teacher = bert(seed=2, layers=3, hidden=48)
    distill_chain([bert(seed=3, hidden=32), bert(seed=4, hidden=16)], teacher, training_args(output_dir, max_steps=1),
                  text_classification_data(), distillers=[{"name": "dgkd", "drop_num": 0}, GuidesRecorder()],
                  guides="all")
    assert [len(guides) for _, guides in GuidesRecorder.seen] == [1, 2]  # one step per stage
    stage_1 = BertForSequenceClassification.from_pretrained(os.path.join(output_dir, "stage_1"))
    (inputs_1, [teacher_1]), (inputs_2, [teacher_2, assistant_2]) = GuidesRecorder.seen
    torch.testing.assert_close(teacher_1, logits(teacher, inputs_1))
    torch.testing.assert_close(teacher_2, logits(teacher, inputs_2))
    torch.testing.assert_close(assistant_2, logits(stage_1, inputs_2))


def test_chain_argument_errors(output_dir):
    with pytest.raises(ValueError, match="`models` lists the assistants and then the student"):
        distill_chain([], bert(seed=2), training_args(output_dir), text_classification_data())
    with pytest.raises(ValueError, match="distill_chain: unknown `guides` 'dense'; `guides` must be one of"):
        distill_chain([bert(seed=1)], bert(seed=2), training_args(output_dir), text_classification_data(),
                      guides="dense")

"""``truncated_copy``: a student initialised from chosen teacher layers, for encoder and decoder models."""

from __future__ import annotations

import pytest
import torch

from conftest import bert, llama
from hf_kd.architecture import truncated_copy


def test_bert_keeps_the_chosen_layers_renumbered_and_every_other_weight():
    teacher = bert(layers=4)
    student = truncated_copy(teacher, [1, 3])
    assert type(student) is type(teacher) and student.config.num_hidden_layers == 2
    for new, old in enumerate([1, 3]):
        for (name, value), (_, expected) in zip(student.bert.encoder.layer[new].state_dict().items(),
                                                teacher.bert.encoder.layer[old].state_dict().items()):
            assert torch.equal(value, expected), name
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)
    assert torch.equal(student.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)


def test_llama_first_layers_give_the_teachers_first_hidden_states():
    teacher = llama(layers=3).eval()
    student = truncated_copy(teacher, range(2)).eval()
    ids = torch.randint(1, 90, (2, 7))
    with torch.no_grad():
        expected = teacher(input_ids=ids, output_hidden_states=True).hidden_states[2]
        actual = student(input_ids=ids, output_hidden_states=True).hidden_states[2]
    assert student.config.num_hidden_layers == 2
    # the student's last hidden state is normed; its pre-norm input equals the teacher's state after 2 layers
    torch.testing.assert_close(student.model.norm(expected), actual)


def test_bad_layer_lists_are_refused():
    with pytest.raises(ValueError, match="indices of BertForSequenceClassification's 2 layers"):
        truncated_copy(bert(layers=2), [0, 2])
    with pytest.raises(ValueError, match="non-empty"):
        truncated_copy(bert(layers=2), [])

"""Configuration errors are raised before training, with a message that says what to change."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import TrainingArguments

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import (
    DistillationTrainer,
    Distiller,
    Requirements,
    build_distiller,
    list_distillers,
)
from hf_kd.teachers import shared_logit_width


def make_args(tmp_path, **kwargs):
    return training_args(tmp_path, **{"max_steps": 2, **kwargs})


# ---- distiller specs ---------------------------------------------------------------------------------------------
def test_unknown_distiller_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="Unknown distiller 'kld'. Valid names: ") as info:
        build_distiller({"name": "kld"})
    for name in ["dkd", "jsd", "kl", "mse", "reverse_kl", "skew_kl", "skew_reverse_kl", "tvd", *list_distillers()]:
        assert name in str(info.value)
    # through the trainer, at construction
    with pytest.raises(ValueError, match="Unknown distiller 'kld'"):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1),
                            args=make_args(tmp_path, distillers=[{"name": "kld"}]))


def test_spec_without_name():
    with pytest.raises(ValueError, match=r"dict like \{'name': 'kl'"):
        build_distiller({"temperature": 2.0})
    with pytest.raises(ValueError, match="a Distiller instance or a dict"):
        build_distiller("kl")


def test_unknown_option_of_a_distiller():
    with pytest.raises(ValueError, match=r"Distiller 'kl' has no option\(s\) \['beta'\]. Its options are: "
                                         r"rectify, teacher_aggregation, temperature, weight"):
        build_distiller({"name": "kl", "beta": 0.5})
    with pytest.raises(ValueError, match=r"Distiller 'dkd' has no option\(s\) \['gamma', 'warmup'\]"):
        build_distiller({"name": "dkd", "warmup": 5, "gamma": 1.0})


def test_unknown_option_of_a_subclass_that_narrows_its_signature():
    with pytest.raises(ValueError,
                       match=r"Distiller 'mse' has no option\(s\) \['temperature'\]. Its options are: "
                             r"rectify, teacher_aggregation, weight"):
        build_distiller({"name": "mse", "temperature": 2.0})


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"name": "jsd", "beta": 1.5}, r"jsd: `beta` must lie in \[0, 1\]"),
        ({"name": "skew_kl", "alpha": 1.0}, r"skew_kl: `alpha` \(skew\) must lie in \[0, 1\)"),
        ({"name": "skew_reverse_kl", "alpha": -0.1}, r"skew_reverse_kl: `alpha` \(skew\) must lie in \[0, 1\)"),
        ({"name": "dkd", "beta": -1.0}, r"dkd: `alpha`, `beta` and `warmup_steps` must be >= 0"),
        ({"name": "dkd", "warmup_steps": -3}, r"dkd: `alpha`, `beta` and `warmup_steps` must be >= 0"),
    ],
)
def test_out_of_range_method_options(spec, match):
    with pytest.raises(ValueError, match=match):
        build_distiller(spec)


# ---- negative knobs ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,match",
    [
        ({"name": "kl", "weight": -1.0}, r"Distiller 'kl': `weight` must be >= 0, got -1.0"),
        ({"name": "kl", "temperature": -2.0}, r"Distiller 'kl': `temperature` must be > 0, got -2.0"),
        ({"name": "reverse_kl", "temperature": 0.0}, r"Distiller 'reverse_kl': `temperature` must be > 0, got 0.0"),
        ({"name": "mse", "weight": -0.5}, r"Distiller 'mse': `weight` must be >= 0, got -0.5"),
    ],
)
def test_negative_weight_or_temperature(tmp_path, spec, match):
    with pytest.raises(ValueError, match=match):
        build_distiller(spec)
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=make_args(tmp_path, distillers=[spec]))


def test_zero_weight_is_allowed():
    assert build_distiller({"name": "kl", "weight": 0.0}).weight == 0.0


def test_negative_hard_label_weight(tmp_path):
    with pytest.raises(ValueError, match=r"`hard_label_weight` must be >= 0, got -0.1"):
        make_args(tmp_path, hard_label_weight=-0.1)


def test_other_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="`distillers` must be a JSON list of dicts"):
        make_args(tmp_path, distillers="[{name: kl}]")
    with pytest.raises(ValueError, match="`loss_chunk_size` must be a positive number of rows, got 0"):
        make_args(tmp_path, loss_chunk_size=0)
    with pytest.raises(ValueError, match="`teacher_dtype` must be one of"):
        make_args(tmp_path, teacher_dtype="float8")
    # a JSON string is parsed
    assert make_args(tmp_path, distillers='[{"name": "kl", "temperature": 2.0}]').distillers == [
        {"name": "kl", "temperature": 2.0}
    ]


# ---- trainer construction ----------------------------------------------------------------------------------------
def test_plain_training_arguments_is_a_type_error(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="`args` must be hf_kd.DistillationArguments .* got TrainingArguments"):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=args, distillers=[{"name": "kl"}])


def test_distillers_in_args_and_as_argument(tmp_path):
    args = make_args(tmp_path, distillers=[{"name": "kl"}])
    with pytest.raises(ValueError, match="Distillers are given both as `distillers=` and in `args.distillers`"):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=args, distillers=[{"name": "tvd"}])


def test_no_distillers_means_kl_at_temperature_2(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_kd.trainer"):
        trainer = DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=make_args(tmp_path))
    assert [d.name for d in trainer.distillers] == ["kl"] and trainer.distillers[0].temperature == 2.0
    assert "No distillers given: using" in caplog.text and "--distillers" in caplog.text


def test_missing_teacher(tmp_path):
    with pytest.raises(ValueError, match=r"Distillers \['kl', 'kl_2'\] need a teacher: pass `teacher_model=`"):
        DistillationTrainer(model=llama(), args=make_args(tmp_path), distillers=[{"name": "kl"}, {"name": "kl"}])


def test_teacher_student_task_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"student BertForSequenceClassification and teacher LlamaForCausalLM solve "
                                         r"different tasks \(classification vs causal_lm\)"):
        DistillationTrainer(model=bert(), teacher_model=llama(), args=make_args(tmp_path), distillers=[{"name": "kl"}])


def test_different_num_labels(tmp_path):
    with pytest.raises(ValueError, match="The student has num_labels=3 but the teacher has num_labels=4"):
        DistillationTrainer(
            model=bert(num_labels=3), teacher_model=bert(num_labels=4, seed=1), args=make_args(tmp_path),
            distillers=[{"name": "kl"}],
        )


def test_different_vocab_sizes(tmp_path):
    with pytest.raises(ValueError, match="Student vocabulary size 97 and teacher vocabulary size 200 differ"):
        DistillationTrainer(model=llama(vocab=97), teacher_model=llama(vocab=200), args=make_args(tmp_path),
                            distillers=[{"name": "kl"}])
    # the other way round names the sizes in the same roles
    with pytest.raises(ValueError, match="Student vocabulary size 200 and teacher vocabulary size 97 differ"):
        DistillationTrainer(model=llama(vocab=200), teacher_model=llama(vocab=97), args=make_args(tmp_path),
                            distillers=[{"name": "kl"}])


def test_a_teacher_of_another_vocabulary_among_several_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_model\[1\] \(read by \['kl'\]\): Student vocabulary size 97 "
                                         r"and teacher vocabulary size 200 differ"):
        DistillationTrainer(model=llama(vocab=97), teacher_model=[llama(vocab=97), llama(vocab=200)],
                            args=make_args(tmp_path), distillers=[{"name": "kl", "teacher_aggregation": "mean"}])
    # a representation distiller may still read it
    DistillationTrainer(model=llama(vocab=97), teacher_model=[llama(vocab=97), llama(vocab=200)],
                        args=make_args(tmp_path), distillers=[{"name": "kl"}, {"name": "hidden_states", "teacher": 1}])


class FakeTokenizer:
    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size


def test_padding_rule_without_tokenizer_is_one_percent():
    # 1% of 100 is 1.0: 99 vs 100 is padding, 98 vs 100 is not
    assert shared_logit_width(llama(vocab=99), llama(vocab=100)) == 99
    assert shared_logit_width(llama(vocab=100), llama(vocab=99)) == 99
    with pytest.raises(ValueError, match="Student vocabulary size 98 and teacher vocabulary size 100 differ .* "
                                         r"\(tokenizer size: None\)"):
        shared_logit_width(llama(vocab=98), llama(vocab=100))


def test_padding_rule_with_tokenizer(caplog):
    # the tokenizer fits in the smaller vocabulary: padding, whatever the size difference
    with caplog.at_level(logging.WARNING, logger="hf_kd.teachers"):
        assert shared_logit_width(llama(vocab=97), llama(vocab=200), FakeTokenizer(90)) == 97
        assert shared_logit_width(llama(vocab=97), llama(vocab=200), FakeTokenizer(97)) == 97
    assert "differ only by padding; distilling on the first 97 logits" in caplog.text
    # the tokenizer has tokens the smaller head cannot score: error, even within 1%
    with pytest.raises(ValueError, match=r"\(tokenizer size: 100\)"):
        shared_logit_width(llama(vocab=99), llama(vocab=100), FakeTokenizer(100))


def _softmax(row, T):
    top = max(row)
    e = [math.exp((z - top) / T) for z in row]
    return [x / sum(e) for x in e]


def _kl_on_prefix(student_logits, teacher_logits, labels, width, T):
    """Token-level T^2 KL(p_t || p_s) on the first `width` logits, mean over shifted positions with a label."""
    total, count = 0.0, 0
    for b in range(len(labels)):
        for t in range(len(labels[b]) - 1):
            if labels[b][t + 1] == -100:
                continue
            ps = _softmax(student_logits[b][t][:width], T)
            pt = _softmax(teacher_logits[b][t][:width], T)
            total += T * T * sum(p * math.log(p / q) for p, q in zip(pt, ps))
            count += 1
    return total / count


@pytest.mark.parametrize("fused", [True, False])
def test_padded_vocab_superset_uses_common_prefix(tmp_path, caplog, fused):
    student, teacher = llama(vocab=128, seed=0), llama(vocab=129, seed=1)
    with caplog.at_level(logging.WARNING, logger="hf_kd.teachers"):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=make_args(tmp_path, hard_label_weight=0.0, fused_lm_loss=fused),
            distillers=[{"name": "kl", "temperature": 2.0}],
        )
    assert "Student vocabulary (128) and teacher vocabulary (129) differ only by padding" in caplog.text
    assert "first 128 logits" in caplog.text

    data = lm_data(n=4, length=8, vocab=128)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert s_logits.shape[-1] == 128 and t_logits.shape[-1] == 129
    labels = batch["labels"].tolist()
    expected = _kl_on_prefix(s_logits.double().tolist(), t_logits.double().tolist(), labels, 128, 2.0)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    # the 129th teacher logit carries probability mass, so renormalising over 129 logits would give another value
    full = _kl_on_prefix([[row + [0.0] for row in seq] for seq in s_logits.double().tolist()],
                         t_logits.double().tolist(), labels, 129, 2.0)
    assert abs(full - expected) > 1e-3 * expected
    loss.backward()  # and the loss trains the student
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_hard_label_weight_without_labels_fails_before_any_step(tmp_path):
    student = llama(seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(
        model=student, teacher_model=llama(seed=1), args=make_args(tmp_path, hard_label_weight=1.0, learning_rate=1e-2),
        distillers=[{"name": "kl"}], train_dataset=lm_data(with_labels=False),
    )
    with pytest.raises(ValueError,
                       match=r"hard_label_weight=1.0 but the batch has no `labels`. Set hard_label_weight=0"):
        trainer.train()
    assert trainer.state.global_step == 0
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_distiller_needing_labels_without_labels(tmp_path):
    trainer = DistillationTrainer(
        model=llama(seed=0), teacher_model=llama(seed=1), args=make_args(tmp_path, hard_label_weight=0.0),
        distillers=[{"name": "kl"}, {"name": "dkd"}], train_dataset=lm_data(with_labels=False),
    )
    with pytest.raises(ValueError, match=r"Distillers \['dkd'\] need `labels` in every batch"):
        trainer.train()
    assert trainer.state.global_step == 0


class AttentionDistiller(Distiller):
    """A test distiller that reads attention maps."""

    requires = Requirements(attentions=True)

    def forward(self, student, teacher, batch):
        return sum(a.sum() for a in student.attentions) * 0.0


@pytest.mark.parametrize(
    "student_impl,teacher_impl,role,bad",
    [("sdpa", "eager", "student", "sdpa"), ("eager", "sdpa", "teacher", "sdpa")],
)
def test_attention_distiller_needs_eager_attention(tmp_path, student_impl, teacher_impl, role, bad):
    with pytest.raises(ValueError, match=rf"reads attention maps, but the {role} uses attn_implementation='{bad}'.*"
                                         r"attn_implementation='eager'"):
        DistillationTrainer(
            model=llama(attn_implementation=student_impl),
            teacher_model=llama(seed=1, attn_implementation=teacher_impl),
            args=make_args(tmp_path), distillers=[AttentionDistiller()],
        )


def test_attention_distiller_accepts_eager_models(tmp_path):
    trainer = DistillationTrainer(
        model=llama(attn_implementation="eager"), teacher_model=llama(seed=1, attn_implementation="eager"),
        args=make_args(tmp_path), distillers=[AttentionDistiller()],
    )
    assert trainer.requirements.attentions


def test_errors_are_raised_for_classifiers_too(tmp_path):
    """A working classifier pair builds; a mismatched one fails at construction, not at train()."""
    DistillationTrainer(model=bert(), teacher_model=bert(seed=1), args=make_args(tmp_path), distillers=[{"name": "kl"}],
                        train_dataset=text_classification_data())
    with pytest.raises(ValueError, match="num_labels=2 but the teacher has num_labels=3"):
        DistillationTrainer(model=bert(num_labels=2), teacher_model=bert(seed=1), args=make_args(tmp_path),
                            distillers=[{"name": "kl"}], train_dataset=text_classification_data())

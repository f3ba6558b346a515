"""A catalogue of bad configurations and the error each one gets before training, naming the setting. Later issues
add rows to the tables."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import bert, llama, lm_data, text_classification_data, training_args, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.progressive import ProgressiveLayers

pytestmark = pytest.mark.usefixtures("one_thread")

BAD_DISTILLERS = [
    ({"name": "kl", "temperature": "two"}, r"Distiller 'kl': `temperature` must be a number .*got 'two' \(str\)"),
    ({"name": "kl", "weight": None}, r"Distiller 'kl': `weight` must be a number .*got None \(NoneType\)"),
    ({"name": "kl", "temperature": [2.0]}, r"Distiller 'kl': `temperature` must be a number .*got \[2.0\] \(list\)"),
    ({"name": "kl", "weight": True}, r"Distiller 'kl': `weight` must be a number .*got True \(bool\)"),
    ({"name": "kl", "weight": float("nan")}, r"Distiller 'kl': `weight` must be a finite number, got nan"),
    ({"name": "kl", "temperature": float("inf")}, r"Distiller 'kl': `temperature` must be a finite number, got inf"),
    ({"name": "kl", "weight": {"schedule": "linear", "start": 0.0, "end": float("nan")}},
     r"`weight` must be a finite number, got nan"),
    ({"name": "kl", "weight": {"schedule": "linear", "start": "zero", "end": 1.0}},
     r"`weight` must be a number .*got 'zero'"),
    ({"name": "kl", "weight": {"start": 0.0, "end": 1.0}},
     r"`weight` schedule .* is invalid: A schedule dict needs its kind, `schedule`: one of constant, linear"),
    ({"name": "kl", "weight": {"schedule": "exp"}}, r"`weight` schedule .* is invalid: Unknown schedule 'exp'"),
    ({"name": "kll"}, r"Unknown distiller 'kll'. Valid names: .*on the command line: --distillers"),
    ({"name": "dgkd", "drop_num": 1.5}, r"dgkd: `drop_num` \(guides dropped per step\) must be an int >= 0, got 1.5"),
    ({"name": "dgkd", "reduction": "max"}, r"dgkd: unknown `reduction` 'max'; `reduction` must be one of 'sum', "
     r"'mean'"),
    ({"name": "ces_kd", "selection": "easiest"}, r"ces_kd: unknown `selection` 'easiest'. Valid names: largest, "
     r"smallest, smallest_correct"),
    ({"name": "ces_kd", "pace": {"schedule": "linear", "start": 0.0, "end": 2.0}},
     r"Distiller 'ces_kd': `pace` must be >= 0 and <= 1.0, got 2.0"),
]


@pytest.mark.parametrize("spec, fragment", BAD_DISTILLERS)
def test_bad_distiller_option_is_refused_when_built(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_distiller(spec)


BAD_ARGUMENTS = [
    ({"hard_label_weight": "0.5"}, r"`hard_label_weight` must be a finite number, got '0.5' \(str\)"),
    ({"hard_label_weight": float("nan")}, r"`hard_label_weight` must be a finite number, got nan"),
    ({"teacher_learning_rate": float("inf")}, r"`teacher_learning_rate` must be a finite number, got inf"),
    ({"nonfinite_loss": "ignore"}, r"`nonfinite_loss` must be 'raise' or 'skip_step'"),
    ({"teacher_sharding": "zero3"}, r"`teacher_sharding` must be 'none' or 'fsdp2', got 'zero3'"),
    ({"teacher_sharding": "fsdp2", "teacher_device": "cpu"}, r"`teacher_device` and teacher_sharding='fsdp2' exclude"),
    ({"teacher_device": "gpu0"}, r"`teacher_device` must name a torch device such as 'cpu' or 'cuda:1', got 'gpu0'"),
]


@pytest.mark.parametrize("overrides, fragment", BAD_ARGUMENTS)
def test_bad_argument_is_refused_when_given(overrides, fragment, tmp_path):
    with pytest.raises(ValueError, match=fragment):
        DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)


def test_one_layer_distiller_name_is_a_list_of_one():
    config = ProgressiveLayers(layer_distillers="hidden_states", final_distillers="kl", steps_per_layer=2)
    assert config.layer_distillers == ["hidden_states"] and config.final_distillers == ["kl"]


def args_for(tmp_path, **overrides):
    return training_args(tmp_path, **{"max_steps": 1, "logging_steps": 1, **overrides})


def test_student_and_teacher_the_same_object_is_refused(tmp_path):
    model = bert()
    with pytest.raises(ValueError, match=r"student \(`model`\) and a teacher \(`teacher_model`\) are the same object"):
        DistillationTrainer(model=model, teacher_model=model, args=args_for(tmp_path), distillers=[{"name": "kl"}])


def test_all_weights_zero_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_kd.trainer"):
        DistillationTrainer(model=bert(), teacher_model=bert(seed=1), args=args_for(tmp_path, hard_label_weight=0.0),
                            distillers=[{"name": "kl", "weight": 0.0}])
    assert "every distiller's weight is 0: the loss is 0" in caplog.text


def test_batch_whose_labels_are_all_masked_contributes_and_logs_zero(tmp_path):
    data = lm_data(n=4).map(lambda row: {"labels": [-100] * len(row["labels"])})
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=llama(layers=3, seed=2), train_dataset=data,
                                  args=args_for(tmp_path), distillers=[{"name": "kl"}])
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["loss"] == 0.0 and log["loss/kl"] == 0.0 and log["loss/hard"] == 0.0
    assert not any(math.isnan(v) for v in log.values() if isinstance(v, float))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())



# ---- caught before training instead of deep inside --------------------------------------------------------------
def vit_pair(student_patch: int, teacher_patch: int):
    return (vit(layers=1, hidden=16, patch_size=student_patch, seed=0),
            vit(layers=1, hidden=16, patch_size=teacher_patch, seed=1))


def test_student_and_teacher_of_different_modalities_are_refused(tmp_path):
    student, _ = vit_pair(2, 2)
    with pytest.raises(ValueError, match=r"reads `pixel_values` but the teacher \(BertForSequenceClassification\) "
                                         r"reads `input_ids`"):
        DistillationTrainer(model=student, teacher_model=bert(num_labels=4), args=args_for(tmp_path),
                            distillers=[{"name": "kl"}])


def test_hidden_states_between_different_patch_grids_is_refused_at_setup(tmp_path):
    student, teacher = vit_pair(2, 4)
    with pytest.raises(ValueError, match=r"student has 16 patch tokens per image and the teacher 4.*tokens='cls'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args_for(tmp_path),
                            distillers=[{"name": "hidden_states"}])
    DistillationTrainer(model=student, teacher_model=teacher, args=args_for(tmp_path),  # pooled tokens pair fine
                        distillers=[{"name": "hidden_states", "tokens": "cls"}])


def test_batch_longer_than_the_teachers_positions_is_refused_on_the_first_batch(tmp_path):
    from transformers import BertForSequenceClassification

    config = bert().config
    config.max_position_embeddings = 8
    trainer = DistillationTrainer(model=bert(), teacher_model=BertForSequenceClassification(config),
                                  args=args_for(tmp_path), train_dataset=text_classification_data(n=4, length=12),
                                  distillers=[{"name": "kl"}])
    with pytest.raises(ValueError, match=r"12 tokens is longer than the teacher's max_position_embeddings=8.*"
                                         r"max_length=8"):
        trainer.train()


def test_bf16_student_trains_through_an_fp32_projector(tmp_path):
    student = bert(seed=1).to(torch.bfloat16)
    trainer = DistillationTrainer(model=student, teacher_model=bert(seed=2, hidden=48), args=args_for(tmp_path),
                                  train_dataset=text_classification_data(n=4),
                                  distillers=[{"name": "hidden_states", "projector": "linear"}])
    before = trainer.distillers[0].projectors["shared"].weight.detach().clone()
    trainer.train()
    assert trainer.distillers[0].projectors["shared"].weight.dtype == torch.float32
    assert not torch.equal(trainer.distillers[0].projectors["shared"].weight, before)
    assert math.isfinite(trainer.state.log_history[0]["loss/hidden_states"])


def test_subclass_of_a_transformers_model_keeps_its_task():
    from transformers import LlamaForCausalLM

    from hf_kd.architecture import task_of

    class MyLlama(LlamaForCausalLM):
        pass

    assert task_of(MyLlama(llama().config)) == "causal_lm"


def test_atsc_on_causal_lms_names_head_module(tmp_path):
    with pytest.raises(ValueError, match=r"atsc needs a classifier head.*task 'causal_lm'.*`head_module`"):
        DistillationTrainer(model=llama(), teacher_model=llama(seed=1), args=args_for(tmp_path),
                            distillers=[{"name": "atsc"}])


# ---- silently wrong inputs ----------------------------------------------------------------------------------------
def test_teacher_only_columns_reach_the_teacher_and_not_the_student(tmp_path):
    from datasets import Dataset
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    student = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=97, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64, num_labels=3))
    teacher = bert()
    rows = text_classification_data(n=4).to_dict()
    rows["token_type_ids"] = [[0] * 6 + [1] * 6 for _ in range(4)]  # sentence pairs
    seen = []
    teacher.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("token_type_ids")),
                                      with_kwargs=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args_for(tmp_path),
                                  train_dataset=Dataset.from_dict(rows), distillers=[{"name": "kl"}])
    trainer.train()  # the student's forward would fail on token_type_ids
    assert seen and seen[0] is not None and seen[0][:, 6:].eq(1).all()


# ---- label order (issue 11) ----------------------------------------------------------------------------------------
def labelled_bert(names, seed):
    return bert(seed=seed, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


def test_teacher_with_permuted_classes_is_refused_naming_both_orders(tmp_path):
    student = labelled_bert(["entailment", "neutral", "contradiction"], 0)
    teacher = labelled_bert(["contradiction", "entailment", "neutral"], 1)
    with pytest.raises(ValueError, match=r"student's classes are \['entailment', 'neutral', 'contradiction'\] and "
                                         r"the teacher's \['contradiction', 'entailment', 'neutral'\]: the same "
                                         r"classes in another order"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args_for(tmp_path), distillers=[{"name": "kl"}])
    same = labelled_bert(["entailment", "neutral", "contradiction"], 1)
    DistillationTrainer(model=student, teacher_model=same, args=args_for(tmp_path), distillers=[{"name": "kl"}])


def test_only_one_side_naming_its_classes_warns(tmp_path, caplog):
    student = labelled_bert(["a", "b", "c"], 0)
    with caplog.at_level(logging.WARNING, logger="hf_kd.teachers"):
        DistillationTrainer(model=student, teacher_model=bert(seed=1), args=args_for(tmp_path),
                            distillers=[{"name": "kl"}])
    assert "Only the student's config names its classes" in caplog.text

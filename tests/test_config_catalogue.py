"""A catalogue of bad configurations and the error each one gets before training, naming the setting. Later issues
add rows to the tables."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from conftest import bert, llama, lm_data
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
]


@pytest.mark.parametrize("overrides, fragment", BAD_ARGUMENTS)
def test_bad_argument_is_refused_when_given(overrides, fragment, tmp_path):
    with pytest.raises(ValueError, match=fragment):
        DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **overrides)


def test_one_layer_distiller_name_is_a_list_of_one():
    config = ProgressiveLayers(layer_distillers="hidden_states", final_distillers="kl", steps_per_layer=2)
    assert config.layer_distillers == ["hidden_states"] and config.final_distillers == ["kl"]


def args_for(tmp_path, **overrides):
    return DistillationArguments(**{"output_dir": str(tmp_path), "report_to": [], "use_cpu": True,
                                    "disable_tqdm": True, "save_strategy": "no", "max_steps": 1,
                                    "per_device_train_batch_size": 4, "logging_steps": 1, **overrides})


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


"""Schedules of distiller knobs: values at chosen steps (computed by hand), parsing, bounds, and use in distillers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from conftest import llama, lm_data
from hf_kd import DistillationArguments, DistillationTrainer, Schedule, build_distiller
from hf_kd.distillers import KLDistiller


# ---- values ------------------------------------------------------------------------------------------------------
def test_constant():
    s = Schedule(start=2.5)
    assert [s(0), s(7), s(10_000, 100)] == [2.5, 2.5, 2.5]
    assert Schedule()(3) == 1.0


def test_linear_with_explicit_steps():
    s = Schedule("linear", start=4.0, end=1.0, start_step=10, end_step=40)
    # slope (1 - 4) / (40 - 10) = -0.1 per step after step 10
    expected = {0: 4.0, 10: 4.0, 11: 3.9, 20: 3.0, 25: 2.5, 39: 1.1, 40: 1.0, 1000: 1.0}
    for step, value in expected.items():
        assert s(step) == pytest.approx(value), step
    # max_steps does not matter once end_step is given
    assert s(25, 1000) == pytest.approx(2.5)


def test_linear_increasing():
    s = Schedule("linear", start=0.0, end=2.0, end_step=8)
    assert [s(k) for k in (0, 2, 4, 8, 9)] == pytest.approx([0.0, 0.5, 1.0, 2.0, 2.0])


def test_cosine_with_explicit_steps():
    s = Schedule("cosine", start=4.0, end=1.0, start_step=10, end_step=40)
    # t = (step - 10) / 30; value = 1 + 3 * (1 + cos(pi t)) / 2
    assert s(10) == pytest.approx(4.0)
    assert s(20) == pytest.approx(1 + 3 * (1 + 0.5) / 2)  # cos(pi/3) = 1/2 -> 3.25
    assert s(20) == pytest.approx(3.25)
    assert s(25) == pytest.approx(2.5)  # cos(pi/2) = 0
    assert s(30) == pytest.approx(1.75)  # cos(2 pi/3) = -1/2
    assert s(40) == pytest.approx(1.0)
    assert s(0) == pytest.approx(4.0) and s(500) == pytest.approx(1.0)
    # cosine differs from linear at interior points
    assert s(20) != pytest.approx(Schedule("linear", start=4.0, end=1.0, start_step=10, end_step=40)(20))


def test_step_schedule():
    s = Schedule("step", start=1.0, gamma=0.5, milestones=(30, 10))  # milestones are sorted
    assert s.milestones == (10, 30)
    expected = {0: 1.0, 9: 1.0, 10: 0.5, 29: 0.5, 30: 0.25, 10_000: 0.25}
    for step, value in expected.items():
        assert s(step) == pytest.approx(value), step


def test_end_step_none_uses_max_steps():
    s = Schedule("linear", start=0.0, end=1.0)
    assert s(50, 100) == pytest.approx(0.5)
    assert s(50, 200) == pytest.approx(0.25)
    assert s(200, 200) == pytest.approx(1.0)
    c = Schedule("cosine", start=0.0, end=1.0, start_step=20)
    # t = (60 - 20) / (100 - 20) = 1/2 -> 0.5; t = (40 - 20) / 80 = 1/4 -> (1 - cos(pi/4)) / 2
    assert c(60, 100) == pytest.approx(0.5)
    assert c(40, 100) == pytest.approx((1 - math.sqrt(2) / 2) / 2)


def test_unknown_length_of_training_gives_start():
    s = Schedule("linear", start=3.0, end=1.0)
    assert s(5) == 3.0 and s(5, None) == 3.0 and s(5, 0) == 3.0


def test_end_step_not_after_start_step_is_a_jump():
    s = Schedule("linear", start=1.0, end=3.0, start_step=5, end_step=5)
    assert [s(0), s(4), s(5), s(6)] == [1.0, 1.0, 3.0, 3.0]


def test_explicit_end_step_zero_is_a_jump_at_step_zero():
    s = Schedule("linear", start=1.0, end=3.0, end_step=0)
    assert [s(0), s(5), s(5, 100)] == [3.0, 3.0, 3.0]


def test_values_lists_every_reachable_value():
    assert Schedule("linear", start=4.0, end=1.0).values() == [4.0, 1.0]
    assert Schedule("step", start=2.0, gamma=0.5, milestones=(1, 2)).values() == pytest.approx([2.0, 1.0, 0.5])


# ---- parsing -----------------------------------------------------------------------------------------------------
def test_from_dict_round_trip():
    spec = {"schedule": "step", "start": 1.0, "milestones": [20, 10], "gamma": 0.1}
    s = Schedule.from_dict(spec)
    assert s.milestones == (10, 20)
    assert s(15) == pytest.approx(0.1) and s(25) == pytest.approx(0.01)
    assert Schedule.from_dict(s.to_dict()) == s


def test_from_dict_unknown_option():
    with pytest.raises(ValueError, match=r"Unknown schedule option\(s\) \['stop'\]; valid options are .*'end'"):
        Schedule.from_dict({"schedule": "linear", "start": 1.0, "stop": 0.0})


def test_unknown_kind_and_missing_end():
    with pytest.raises(ValueError,
                       match="Unknown schedule 'exponential'; choose one of constant, linear, cosine, step"):
        Schedule.from_dict({"schedule": "exponential"})
    with pytest.raises(ValueError, match="A 'cosine' schedule needs `end`"):
        Schedule("cosine", start=1.0)


# ---- schedules inside distillers ---------------------------------------------------------------------------------
S = [[1.0, 2.0, 0.5]]
T = [[2.0, 0.0, 1.0]]


def hand_kl(temperature):
    def softmax(row):
        e = [math.exp(z / temperature) for z in row]
        return [x / sum(e) for x in e]

    ps, pt = softmax(S[0]), softmax(T[0])
    return temperature**2 * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def test_dict_valued_temperature_in_spec():
    d = build_distiller({"name": "kl", "temperature": {"schedule": "linear", "start": 4.0, "end": 1.0}})
    assert isinstance(d.schedules["temperature"], Schedule)
    assert d.temperature == 4.0  # value at step 0 before training
    for step, expected in [(0, 4.0), (50, 2.5), (75, 1.75), (100, 1.0)]:
        d.set_progress(step, 100)
        assert d.temperature == pytest.approx(expected)
        # the loss uses the current temperature
        assert d.row_loss(torch.tensor(S), torch.tensor(T), None).item() == pytest.approx(hand_kl(expected), rel=1e-5)
    assert d.weight == 1.0 and "weight" not in d.schedules


def test_dict_valued_weight_in_spec():
    d = build_distiller({"name": "kl", "weight": {"schedule": "step", "start": 2.0, "gamma": 0.25, "milestones": [10]}})
    assert d.weight == 2.0
    d.set_progress(9, 100)
    assert d.weight == pytest.approx(2.0)
    d.set_progress(10, 100)
    assert d.weight == pytest.approx(0.5)
    assert d.temperature == 1.0


def test_schedule_instance_in_constructor():
    d = KLDistiller(temperature=Schedule("cosine", start=3.0, end=1.0, end_step=10))
    d.set_progress(5, None)
    assert d.temperature == pytest.approx(2.0)
    d.set_progress(10, None)
    assert d.temperature == pytest.approx(1.0)


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"name": "kl", "weight": {"schedule": "linear", "start": 1.0, "end": -0.5}},
         r"`weight` must be >= 0, got -0.5"),
        ({"name": "kl", "weight": {"schedule": "constant", "start": -1.0}}, r"`weight` must be >= 0, got -1.0"),
        ({"name": "kl", "temperature": {"schedule": "linear", "start": 2.0, "end": 0.0}},
         r"`temperature` must be > 0, got 0.0"),
        ({"name": "kl", "temperature": {"schedule": "cosine", "start": -1.0, "end": 1.0}},
         r"`temperature` must be > 0, got -1.0"),
        # a step schedule with a negative gamma reaches -0.5 after the first milestone
        ({"name": "dkd", "weight": {"schedule": "step", "start": 1.0, "gamma": -0.5, "milestones": [5]}},
         r"`weight` must be >= 0, got -0.5"),
    ],
)
def test_negative_schedule_values_rejected_at_construction(spec, match):
    with pytest.raises(ValueError, match=match):
        build_distiller(spec)


def test_unknown_schedule_option_inside_distiller_spec():
    with pytest.raises(ValueError, match=r"Unknown schedule option\(s\) \['finish'\]"):
        build_distiller({"name": "kl", "temperature": {"schedule": "linear", "start": 2.0, "finish": 1.0}})


def test_trainer_applies_schedule_at_every_step(tmp_path):
    """During training the temperature follows the schedule with end_step = max_steps = 4."""
    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(trainer.distillers[0].temperature)

    args = DistillationArguments(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=4, per_device_train_batch_size=4,
        hard_label_weight=0.0, logging_steps=100, save_strategy="no",
        distillers=[{"name": "kl", "temperature": {"schedule": "linear", "start": 4.0, "end": 1.0}}],
    )
    trainer = DistillationTrainer(
        model=llama(seed=0), teacher_model=llama(seed=1), args=args, train_dataset=lm_data(n=16),
        callbacks=[Record()],
    )
    assert trainer.distillers[0].temperature == 4.0
    trainer.train()
    # the schedule is applied at the start of steps 0..3: 4 - 3 * k / 4
    assert seen == pytest.approx([4.0, 3.25, 2.5, 1.75])

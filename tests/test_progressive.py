"""Progressive (PID) and stacked (SID) layer schedules of Aguilar et al. (2020): the phase arithmetic, errors
before training, and which layer sub-terms and final-KD weight each logged step shows, also after a resume."""

from __future__ import annotations

import pytest

from conftest import bert_pair, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.progressive import ProgressiveLayerCallback, ProgressiveLayers

DISTILLERS = [{"name": "attention", "loss": "kl"}, {"name": "hidden_states", "loss": "cosine", "tokens": "cls"},
              {"name": "kl", "temperature": 2.0}]


def set_up(*specs):
    student, teacher = bert_pair()
    distillers = [build_distiller(spec) for spec in specs]
    for distiller in distillers:
        distiller.setup(student, teacher)
    return distillers, [spec["name"] for spec in specs]


# ---- the schedule and its errors --------------------------------------------------------------------------------
def test_phases_progressive_and_stacked():
    pid = ProgressiveLayers(["attention"], mode="progressive", steps_per_layer=2)
    sid = ProgressiveLayers(["attention"], mode="stacked", steps_per_layer=2)
    layers = [0, 1, 2]
    assert [pid.active_layers(layers, step, 2) for step in range(7)] == [{0}, {0}, {1}, {1}, {2}, {2}, set()]
    assert [sid.active_layers(layers, step, 2) for step in range(7)] == [
        {0}, {0}, {0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2}, set()]


def test_callback_schedules_the_union_of_mapped_layers():
    distillers, keys = set_up({"name": "attention"}, {"name": "hidden_states", "include_embeddings": True})
    callback = ProgressiveLayerCallback(distillers, keys, layer_distillers=keys, steps_per_layer=1)
    assert callback.layers == [0, 1, 2]


@pytest.mark.parametrize("options, message", [
    ({"layer_distillers": ["attention"]}, "exactly one of `steps_per_layer` and `epochs_per_layer`"),
    ({"layer_distillers": ["attention"], "steps_per_layer": 0}, "must be > 0"),
    ({"layer_distillers": ["attention"], "steps_per_layer": 1, "mode": "top_down"}, "unknown `mode` 'top_down'"),
    ({"layer_distillers": ["attention"], "steps_per_layer": 1, "epochs": 1},
     r"Unknown progressive layers option\(s\) \['epochs'\]"),
    ({"layer_distillers": ["attention"], "steps_per_layer": 1, "final_distillers": ["attention"]}, "both layer-sch"),
    ({"layer_distillers": ["attn"], "steps_per_layer": 1}, r"no distiller with key\(s\) \['attn'\]; the trainer's"),
    ({"layer_distillers": ["kl"], "steps_per_layer": 1}, r"\['kl'\] are not layer-mapped distillers"),
])
def test_configuration_errors(options, message):
    distillers, keys = set_up({"name": "attention"}, {"name": "kl"})
    with pytest.raises(ValueError, match=message):
        ProgressiveLayerCallback(distillers, keys, **options)


def test_final_distiller_with_a_weight_schedule_and_callback_built_before_setup():
    distillers, keys = set_up({"name": "attention"}, {"name": "kl", "weight": {"schedule": "linear", "end": 0.0,
                                                                              "start": 1.0}})
    with pytest.raises(ValueError, match=r"final distillers \['kl'\] have a weight schedule"):
        ProgressiveLayerCallback(distillers, keys, layer_distillers=["attention"], final_distillers=["kl"],
                                 steps_per_layer=1)
    with pytest.raises(ValueError, match="build the callback after the DistillationTrainer"):
        ProgressiveLayerCallback([build_distiller({"name": "attention"})], ["attention"],
                                 layer_distillers=["attention"], steps_per_layer=1)


# ---- in training ------------------------------------------------------------------------------------------------
def train(tmp_path, schedule, max_steps=6, resume=None, via_arguments=False, **overrides):
    """Train with the schedule given as `DistillationArguments.progressive_layers` or as an added callback."""
    student, teacher = bert_pair()
    options = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                   logging_steps=1, max_steps=max_steps, per_device_train_batch_size=8, hard_label_weight=0.0,
                   progressive_layers=schedule if via_arguments else None)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=DistillationArguments(**{**options, **overrides}),
                                  train_dataset=text_classification_data(), distillers=DISTILLERS)
    if via_arguments:
        callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressiveLayerCallback))
    else:
        callback = ProgressiveLayerCallback(trainer.distillers, trainer.distiller_keys, **schedule)
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def check_logs(log_history, expected_layers):
    """Each logged step shows exactly the active layers' sub-terms; KD weight 0 during the phases, 1 after."""
    logs = [entry for entry in log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == sorted(expected_layers)
    for entry in logs:
        layers = expected_layers[entry["step"]]
        for key in ("attention", "hidden_states"):
            logged = {int(k.rsplit("_", 1)[1]) for k in entry if k.startswith(f"loss/{key}/layer_")}
            assert logged == layers
            assert all(entry[f"loss/{key}/layer_{layer}"] > 0 for layer in layers)
        kd_weight = 0.0 if layers else 1.0
        assert entry["loss/kl"] > 0
        expected = entry["loss/attention"] + entry["loss/hidden_states"] + kd_weight * entry["loss/kl"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-5)


# Logged step g is optimizer step g - 1; two layers, two steps per layer, then KD only.
PID = {1: {1}, 2: {1}, 3: {2}, 4: {2}, 5: set(), 6: set()}
SID = {1: {1}, 2: {1}, 3: {1, 2}, 4: {1, 2}, 5: set(), 6: set()}


@pytest.mark.parametrize("mode, per_layer, expected, via_arguments", [
    ("progressive", {"steps_per_layer": 2}, PID, False),
    ("stacked", {"epochs_per_layer": 1}, SID, True),  # 16 samples, batch 8: one epoch is two steps
])
def test_layers_and_final_kd_switch_at_the_right_steps(tmp_path, mode, per_layer, expected, via_arguments):
    schedule = dict(layer_distillers=["attention", "hidden_states"], mode=mode, final_distillers=["kl"], **per_layer)
    trainer, callback = train(tmp_path, schedule, via_arguments=via_arguments)
    assert callback.steps_per_layer == 2
    check_logs(trainer.state.log_history, expected)


def test_resume_mid_schedule_continues_it(tmp_path):
    schedule = dict(layer_distillers=["attention", "hidden_states"], final_distillers=["kl"], steps_per_layer=2)
    train(tmp_path, schedule, max_steps=6, save_strategy="steps", save_steps=3)
    resumed, _ = train(tmp_path, schedule, max_steps=6, resume=str(tmp_path / "checkpoint-3"))
    check_logs(resumed.state.log_history, PID)
    assert resumed.distillers[2].weight == 1.0

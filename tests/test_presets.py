"""Composite distillers and the TinyBERT preset: components against the generic distillers, the two-stage switch
in training, and gradients through the projectors."""

from __future__ import annotations

import pytest
import torch

from conftest import bert_pair, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.capture import ModelView
from hf_kd.distillers.composite import CompositeDistiller
from hf_kd.distillers.logit import KLDistiller
from hf_kd.distillers.representation import AttentionDistiller, HiddenStatesDistiller
from hf_kd.distillers.tinybert import TinyBERTDistiller

COMPONENTS = ("embedding", "hidden", "attention", "prediction")


def views(student, teacher):
    data = text_classification_data(n=4)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    flags = {"output_hidden_states": True, "output_attentions": True}
    s_out, t_out = student(**batch, **flags), teacher(**batch, **flags)
    make = lambda model, out: ModelView(model=model, task="classification", logits=out.logits,  # noqa: E731
                                        hidden_states=out.hidden_states, attentions=out.attentions)
    return make(student, s_out), make(teacher, t_out), batch


def generic(distiller, student, teacher, projector_state=None):
    distiller.setup(student, teacher)
    if projector_state is not None:
        distiller.load_state_dict(projector_state)
    return distiller


def test_tinybert_components_equal_the_generic_distillers():
    student, teacher = bert_pair()
    tiny = build_distiller({"name": "tinybert", "temperature": 2.0, "intermediate_steps": 3})
    assert isinstance(tiny, TinyBERTDistiller) and list(tiny.components) == list(COMPONENTS)
    assert (tiny.requires.logits, tiny.requires.hidden_states, tiny.requires.attentions) == (True, True, True)
    tiny.setup(student, teacher)
    embedding, hidden = tiny.components["embedding"], tiny.components["hidden"]
    assert embedding.layer_map == {0: 0} and hidden.layer_map == {1: 2, 2: 4}
    assert embedding.projectors["shared"] is not hidden.projectors["shared"]  # W_e and W_h
    assert hidden.projectors["shared"].weight.shape == (48, 32)

    s, t, batch = views(student, teacher)
    loss, parts = tiny(s, t, batch)
    expected = {
        "embedding": generic(HiddenStatesDistiller(layer_map={0: 0}), student, teacher, embedding.state_dict()),
        "hidden": generic(HiddenStatesDistiller(), student, teacher, hidden.state_dict()),
        "attention": generic(AttentionDistiller(loss="mse"), student, teacher),
        "prediction": generic(KLDistiller(temperature=2.0), student, teacher),
    }
    for name, distiller in expected.items():
        result = distiller(s, t, batch)
        value, sub_terms = result if isinstance(result, tuple) else (result, {})
        torch.testing.assert_close(parts[name], value)
        for part, v in sub_terms.items():
            torch.testing.assert_close(parts[f"{name}/{part}"], v)
    assert parts["prediction"] > 0 and "hidden/layer_2" in parts
    torch.testing.assert_close(loss, parts["embedding"] + parts["hidden"] + parts["attention"])  # stage 1

    tiny.set_progress(3, None)  # stage 2: the prediction layer alone
    loss, parts = tiny(s, t, batch)
    assert [tiny.components[c].weight for c in COMPONENTS] == [0.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(loss, parts["prediction"])


def test_gradients_reach_both_projectors_in_stage_1_only():
    student, teacher = bert_pair()
    tiny = build_distiller({"name": "tinybert", "intermediate_steps": 1})
    tiny.setup(student, teacher)
    projectors = [tiny.components[c].projectors["shared"].weight for c in ("embedding", "hidden")]
    for step, reached in ((0, True), (1, False)):
        tiny.set_progress(step, None)
        tiny.zero_grad()
        s, t, batch = views(student, teacher)
        loss, _ = tiny(s, t, batch)
        loss.backward()
        assert [bool(p.grad.abs().sum() > 0) for p in projectors] == [reached, reached]


def test_single_stage_and_option_errors():
    joint = TinyBERTDistiller(intermediate_steps=None)
    joint.set_progress(10_000, None)
    assert [joint.components[c].weight for c in COMPONENTS] == [1.0] * 4
    prediction_only = TinyBERTDistiller(intermediate_steps=0)
    assert [prediction_only.components[c].weight for c in COMPONENTS] == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="`intermediate_steps` must be >= 0"):
        TinyBERTDistiller(intermediate_steps=-1)
    with pytest.raises(ValueError, match="contain neither"):
        CompositeDistiller({"a.b": {"name": "kl"}})
    with pytest.raises(ValueError, match=r"Distiller 'tinybert' has no option\(s\) \['components'\]"):
        build_distiller({"name": "tinybert", "components": {}})


def test_composite_by_name_sums_weighted_children_and_logs_their_parts():
    student, teacher = bert_pair()
    composite = build_distiller({"name": "composite", "components": {
        "soft": {"name": "kl"}, "deep": {"name": "hidden_states", "weight": 2.0, "layer_map": {2: 4}}}})
    composite.setup(student, teacher)
    s, t, batch = views(student, teacher)
    loss, parts = composite(s, t, batch)
    assert sorted(parts) == ["deep", "deep/layer_2", "soft"]
    torch.testing.assert_close(loss, parts["soft"] + 2.0 * parts["deep"])


def test_two_stages_in_training(tmp_path):
    student, teacher = bert_pair()
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 save_strategy="no", logging_steps=1, max_steps=4, per_device_train_batch_size=4,
                                 hard_label_weight=0.0, learning_rate=1e-3)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=text_classification_data(),
        distillers=[{"name": "tinybert", "intermediate_steps": 2, "weight": 0.5}],
    )
    projector = trainer.distillers[0].components["hidden"].projectors["shared"].weight.detach().clone()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for entry in logs:
        step = entry["step"] - 1  # the optimizer step the logged loss was computed at
        assert all(entry[f"loss/tinybert/{c}"] > 0 for c in COMPONENTS) and "loss/hard" not in entry
        weights = (1, 1, 1, 0) if step < 2 else (0, 0, 0, 1)
        weighted = sum(w * entry[f"loss/tinybert/{c}"] for w, c in zip(weights, COMPONENTS))
        assert entry["loss/tinybert"] == pytest.approx(weighted, rel=1e-5)
        assert entry["loss"] == pytest.approx(0.5 * weighted, rel=1e-5)
    trained = trainer.distillers[0].components["hidden"].projectors["shared"].weight
    assert not torch.equal(projector, trained.detach())

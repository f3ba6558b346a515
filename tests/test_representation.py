"""Internal-representation distillers against hand-computed values, and their projectors in training."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from conftest import EAGER, bert, bert_pair, llama, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.capture import FeatureSpec, ModelView
from hf_kd.trainer import DISTILLER_STATE_NAME


def view(hidden=None, attentions=None, features=None, task="classification"):
    return ModelView(model=nn.Identity(), task=task, hidden_states=hidden, attentions=attentions,
                     features=features or {})


def distiller(spec, student, teacher):
    d = build_distiller(spec)
    d.setup(student, teacher)
    return d


# ---- hidden states ----------------------------------------------------------------------------------------------
def test_hidden_states_mse_over_non_padding_tokens():
    d = distiller({"name": "hidden_states", "layer_map": {1: 1}}, bert(layers=1), bert(layers=1))
    hs = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])  # [B=1, T=3, D=2]; token 3 is padding
    ht = torch.tensor([[[0.0, 2.0], [3.0, 2.0], [0.0, 0.0]]])
    loss, parts = d(view((hs, hs)), view((ht, ht)), {"attention_mask": torch.tensor([[1, 1, 0]])})
    expected = ((1**2 + 0**2) / 2 + (0**2 + 2**2) / 2) / 2  # mean over dims, then over the 2 real tokens
    assert loss.item() == pytest.approx(expected) and parts["layer_1"].item() == pytest.approx(expected)


def test_hidden_states_pkd_on_cls_and_cosine_on_mean_tokens():
    hs = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    ht = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    pkd = distiller({"name": "hidden_states", "loss": "pkd", "tokens": "cls", "layer_map": {1: 1}}, bert(layers=1),
                    bert(layers=1))
    loss, _ = pkd(view((hs, hs)), view((ht, ht)), {})
    assert loss.item() == pytest.approx((0.6 - 0.0) ** 2 + (0.8 - 1.0) ** 2)  # |s/|s| - t/|t||^2
    cosine = distiller({"name": "hidden_states", "loss": "cosine", "tokens": "mean", "layer_map": {1: 1}},
                       bert(layers=1), bert(layers=1))
    loss, _ = cosine(view((hs, hs)), view((ht, ht)), {})
    s_mean, t_mean = (2.0, 2.0), (0.5, 1.5)
    cos = (s_mean[0] * t_mean[0] + s_mean[1] * t_mean[1]) / (math.hypot(*s_mean) * math.hypot(*t_mean))
    assert loss.item() == pytest.approx(1 - cos)


def test_hidden_states_last_token_of_right_padded_causal_lm():
    d = distiller({"name": "hidden_states", "tokens": "last", "layer_map": {1: 1}}, llama(layers=1), llama(layers=1))
    hs = torch.tensor([[[1.0], [2.0], [7.0]], [[1.0], [5.0], [6.0]]])
    ht = torch.zeros_like(hs)
    loss, _ = d(view((hs, hs)), view((ht, ht)), {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])})
    assert loss.item() == pytest.approx((2.0**2 + 6.0**2) / 2)


def test_hidden_states_layer_map_projector_and_mean_over_layers():
    student, teacher = bert(layers=2, hidden=32), bert(layers=4, hidden=48)
    d = distiller({"name": "hidden_states", "include_embeddings": True}, student, teacher)
    assert d.layer_map == {0: 0, 1: 2, 2: 4}
    assert isinstance(d.projectors["shared"], nn.Linear) and d.projectors["shared"].weight.shape == (48, 32)
    hs = tuple(torch.randn(2, 3, 32) for _ in range(3))
    ht = tuple(torch.randn(2, 3, 48) for _ in range(5))
    loss, parts = d(view(hs), view(ht), {})
    proj = d.projectors["shared"]
    expected = [((proj(hs[s]) - ht[t]) ** 2).mean() for s, t in d.layer_map.items()]
    torch.testing.assert_close(loss, torch.stack(expected).mean())
    assert sorted(parts) == ["layer_0", "layer_1", "layer_2"]
    d.active_layers = {1}  # what a progressive schedule does
    loss, parts = d(view(hs), view(ht), {})
    torch.testing.assert_close(loss, expected[1])
    per_layer = distiller({"name": "hidden_states", "projector_per_layer": True, "projector": "mlp"}, student, teacher)
    assert sorted(per_layer.projectors) == ["1", "2"]


# ---- attention maps ---------------------------------------------------------------------------------------------
def test_attention_kl_per_query_row_ignores_padding():
    d = distiller({"name": "attention", "layer_map": {1: 1}}, bert(layers=1, **EAGER), bert(layers=1, **EAGER))
    a_t = torch.tensor([[[[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.3, 0.3, 0.4]]]])  # [B=1, H=1, T=3, T=3]
    a_s = torch.tensor([[[[0.75, 0.25, 0.0], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]]])
    loss, _ = d(view(attentions=(a_s,)), view(attentions=(a_t,)), {"attention_mask": torch.tensor([[1, 1, 0]])})
    row1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    row2 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert loss.item() == pytest.approx((row1 + row2) / 2)  # padded query row 3 ignored


def test_attention_mse_over_valid_pairs_and_head_mismatch():
    d = distiller({"name": "attention", "loss": "mse", "layer_map": {1: 1}}, bert(layers=1, **EAGER),
                  bert(layers=1, **EAGER))
    a_s = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a_t = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])
    loss, _ = d(view(attentions=(a_s,)), view(attentions=(a_t,)), {})
    assert loss.item() == pytest.approx((0.25 + 0.25 + 0.25 + 0.25) / 4)
    loss, _ = d(view(attentions=(a_s,)), view(attentions=(a_t,)), {"attention_mask": torch.tensor([[1, 0]])})
    assert loss.item() == pytest.approx(0.25)  # only (query 1, key 1)

    teacher_4_heads = bert(layers=1, heads=4, **EAGER)
    averaged = distiller({"name": "attention", "layer_map": {1: 1}}, bert(layers=1, **EAGER), teacher_4_heads)
    a_s2 = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # 2 heads, one query row -> average (0.5, 0.5)
    a_t4 = torch.tensor([[[[0.5, 0.5]]] * 4])
    loss, _ = averaged(view(attentions=(a_s2,)), view(attentions=(a_t4,)), {})
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="student has 2 heads and the teacher 4"):
        distiller({"name": "attention", "head_mismatch": "error"}, bert(layers=1, **EAGER), teacher_4_heads)


# ---- hooked features --------------------------------------------------------------------------------------------
def test_feature_distiller_sizes_projector_from_modules_and_pools_maps():
    class Conv(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.body = nn.Conv2d(1, channels, 3, padding=1)

    d = distiller({"name": "feature", "student_module": "body", "teacher_module": "body"}, Conv(2), Conv(3))
    assert isinstance(d.projector, nn.Conv2d) and (d.projector.in_channels, d.projector.out_channels) == (2, 3)
    nn.init.ones_(d.projector.weight), nn.init.zeros_(d.projector.bias)
    f_s = torch.ones(1, 2, 4, 4)
    f_t = torch.zeros(1, 3, 2, 2)
    spec = FeatureSpec("body")
    loss = d(view(features={spec: f_s}), view(features={spec: f_t}), {})
    assert loss.item() == pytest.approx(4.0)  # projected value 2 everywhere, pooled 4x4 -> 2x2, (2-0)^2

    tokens = distiller({"name": "feature", "student_module": "bert.encoder.layer.0.output",
                        "teacher_module": "bert.encoder.layer.2.output"}, bert(hidden=32), bert(layers=3, hidden=48))
    assert tokens.projector.weight.shape == (48, 32)
    with pytest.raises(ValueError, match="has no submodule 'bert.encoder.layer.7.output'"):
        distiller({"name": "feature", "student_module": "bert.encoder.layer.7.output",
                   "teacher_module": "bert.encoder.layer.0.output"}, bert(), bert())


# ---- in training ------------------------------------------------------------------------------------------------
def test_projectors_train_are_checkpointed_and_never_exported(tmp_path):
    student, teacher = bert_pair()
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 max_steps=2, save_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=text_classification_data(),
        distillers=[{"name": "hidden_states", "projector_per_layer": True}, {"name": "attention"},
                    {"name": "feature", "student_module": "bert.pooler.dense", "teacher_module": "bert.pooler.dense"}],
    )
    before = {k: v.clone() for k, v in trainer.distillers.state_dict().items()}
    trainer.train()
    after = trainer.distillers.state_dict()
    assert set(before) == {"0.projectors.1.weight", "0.projectors.1.bias", "0.projectors.2.weight",
                           "0.projectors.2.bias", "2.projector.weight", "2.projector.bias"}
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every projector learned
    saved = torch.load(os.path.join(tmp_path, "checkpoint-2", DISTILLER_STATE_NAME))
    assert all(torch.equal(saved[k], after[k]) for k in after)
    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert set(exported) == set(student.state_dict())


@pytest.mark.parametrize("factory", [vit, llama])
def test_hidden_and_attention_distillation_runs_for_vit_and_causal_lm(tmp_path, factory):
    from conftest import image_data, lm_data

    data = image_data() if factory is vit else lm_data()
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 max_steps=2, logging_steps=1, save_strategy="no", per_device_train_batch_size=4)
    trainer = DistillationTrainer(
        model=factory(seed=1, **EAGER), teacher_model=factory(layers=4, hidden=48, seed=2, **EAGER), args=args,
        train_dataset=data, distillers=[{"name": "hidden_states", "tokens": "cls" if factory is vit else "all"},
                                        {"name": "attention"}],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert {"loss/hidden_states/layer_1", "loss/hidden_states/layer_2", "loss/attention/layer_2"} <= logs.keys()
    assert all(math.isfinite(v) and v >= 0 for k, v in logs.items() if k.startswith("loss/"))


# ---- MiniLMv2 relations -----------------------------------------------------------------------------------------
def _explicit_relation_kl(x_s, x_t, heads, mask):
    """sum over relation heads/rows of KL(softmax(x_t x_t^T/sqrt d) || softmax(x_s x_s^T/sqrt d)), written out."""
    total, count = 0.0, 0
    batch, length, _ = x_s.shape
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                if not mask[b, i]:
                    continue
                rows = []
                for x in (x_s, x_t):
                    d = x.shape[-1] // heads
                    q = x[b, i, h * d:(h + 1) * d]
                    scores = [float(q @ x[b, j, h * d:(h + 1) * d]) / math.sqrt(d) if mask[b, j] else -math.inf
                              for j in range(length)]
                    top = max(scores)
                    exps = [math.exp(v - top) for v in scores]
                    rows.append([e / sum(exps) for e in exps])
                p_s, p_t = rows
                total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s) if pt > 0)
                count += 1
    return total / count


def test_minilm_relation_matches_explicit_kl_with_different_head_counts():
    student, teacher = bert(layers=2, hidden=32, heads=2), bert(layers=4, hidden=48, heads=4)
    d = distiller({"name": "minilm_relation", "num_relation_heads": 4, "relations": ["query", "value"]}, student,
                  teacher)
    assert d.layer_map == {2: 4}
    assert [s.path for s in d.student_features()] == ["bert.encoder.layer.1.attention.self.query",
                                                      "bert.encoder.layer.1.attention.self.value"]
    assert [s.path for s in d.teacher_features()] == ["bert.encoder.layer.3.attention.self.query",
                                                      "bert.encoder.layer.3.attention.self.value"]
    g = torch.Generator().manual_seed(0)
    s_feats = {spec: torch.randn(2, 3, 32, generator=g) for spec in d.student_features()}
    t_feats = {spec: torch.randn(2, 3, 48, generator=g) for spec in d.teacher_features()}
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, parts = d(view(features=s_feats), view(features=t_feats), {"attention_mask": mask})
    s_specs, t_specs = d.student_features(), d.teacher_features()
    expected_q = _explicit_relation_kl(s_feats[s_specs[0]], t_feats[t_specs[0]], 4, mask)
    expected_v = _explicit_relation_kl(s_feats[s_specs[1]], t_feats[t_specs[1]], 4, mask)
    assert parts["layer_2/query"].item() == pytest.approx(expected_q, rel=1e-5)
    assert parts["layer_2/value"].item() == pytest.approx(expected_v, rel=1e-5)
    assert loss.item() == pytest.approx(expected_q + expected_v, rel=1e-5)


def test_minilm_relation_resolves_projections_across_architectures():
    from conftest import gpt2

    assert {s.path for s in distiller({"name": "minilm_relation"}, vit(), vit(layers=3)).student_features()} == {
        "vit.layers.1.attention.q_proj", "vit.layers.1.attention.k_proj", "vit.layers.1.attention.v_proj"}
    assert {s.path for s in distiller({"name": "minilm_relation"}, llama(), llama(layers=3)).teacher_features()} == {
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj", "model.layers.2.self_attn.v_proj"}
    fused = distiller({"name": "minilm_relation"}, gpt2(), gpt2(layers=3))
    assert [p.part for p in fused.projections[("student", 2)].values()] == [0, 1, 2]
    custom = distiller({"name": "minilm_relation", "relations": ["key"],
                        "student_modules": {"key": "bert.encoder.layer.{index}.attention.self.key"}}, bert(), bert())
    assert [s.path for s in custom.student_features()] == ["bert.encoder.layer.1.attention.self.key"]
    with pytest.raises(ValueError, match="num_relation_heads=5 does not divide the student's query width 32"):
        distiller({"name": "minilm_relation", "num_relation_heads": 5}, bert(), bert())


def test_bert_6x384_teacher_to_2x128_student_runs_every_representation_distiller(tmp_path):
    """The issue's reference pair; block_swap needs equal widths, so it gets a 6-layer teacher of width 128."""
    data = text_classification_data(n=8)
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                 max_steps=2, logging_steps=1, save_strategy="no", per_device_train_batch_size=4)
    student = bert(layers=2, hidden=128, heads=2, seed=1, **EAGER)
    distillers = [
        {"name": "hidden_states", "layer_map": "skip", "loss": "pkd", "tokens": "cls"},
        {"name": "attention", "head_mismatch": "average"},
        {"name": "minilm_relation", "num_relation_heads": 4},
        {"name": "feature", "student_module": "bert.encoder.layer.1.output.dense",
         "teacher_module": "bert.encoder.layer.5.output.dense"},
        {"name": "tinybert", "intermediate_steps": 1},
        {"name": "instance_feature"},
        {"name": "feature_mixing", "ratio": 0.5},
    ]
    for teacher, specs in ((bert(layers=6, hidden=384, heads=12, seed=2, **EAGER), distillers),
                           (bert(layers=6, hidden=128, heads=2, seed=3, **EAGER), [{"name": "block_swap"}])):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      distillers=specs)
        trainer.train()
        logged = trainer.state.log_history[0]
        for key in trainer.distiller_keys:
            assert math.isfinite(logged[f"loss/{key}"]), key
        if len(specs) > 1:
            assert trainer.distillers[0].layer_map == {1: 3}  # PKD-Skip, 6 -> 2
            assert trainer.distillers[1].layer_map == {1: 3, 2: 6} and trainer.distillers[1].average_heads


@pytest.mark.parametrize("name", ["attention", "tinybert", "instance_feature"])
def test_attention_reading_distillers_refuse_sdpa_models_before_training(tmp_path, name):
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*attn_implementation='eager'"):
        DistillationTrainer(model=bert(attn_implementation="sdpa"), teacher_model=bert(layers=4, **EAGER), args=args,
                            distillers=[{"name": name}])


def test_minilm_relation_defaults_to_the_largest_head_count_that_divides_every_width():
    """12 teacher heads do not divide a 40-wide student: 8 is the largest count <= 12 dividing 40 and 48."""
    d = distiller({"name": "minilm_relation"}, bert(hidden=40, heads=4), bert(hidden=48, heads=12))
    assert d.num_relation_heads == 8
    same_width = distiller({"name": "minilm_relation"}, bert(hidden=48, heads=4), bert(hidden=48, heads=12))
    assert same_width.num_relation_heads == 12

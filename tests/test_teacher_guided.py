"""Teacher-guided distillers: attention-weighted features (ICD), feature mixing (DPK) and block swapping (IAKD)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import EAGER, bert, frozen, gpt2, image_data, llama, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.capture import ModelView


def view(hidden=None, attentions=None, training=True):
    model = nn.Identity().train(training)
    return ModelView(model=model, task="classification", hidden_states=hidden, attentions=attentions)


def distiller(spec, student, teacher):
    d = build_distiller(spec)
    d.setup(student, teacher)
    return d


# Student and teacher layer-1 features [B=1, T=3, D=2]; token 3 is padding. Per-token MSE: 0.5, 2.0 (81 for padding).
HS = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
HT = torch.tensor([[[0.0, 2.0], [3.0, 2.0], [0.0, 0.0]]])
MASK = torch.tensor([[1, 1, 0]])
# Teacher attention [B=1, H=2, T=3, T=3]. Head-mean rows: query 0 -> (0.4, 0.2, 0.4), query 1 -> (0.2, 0.4, 0.4).
ATTENTION = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],
                           [[0.3, 0.1, 0.6], [0.3, 0.2, 0.5], [0.2, 0.2, 0.6]]]])


# ---- instance_feature (ICD) --------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, expected", [
    ({}, 2 / 3 * 0.5 + 1 / 3 * 2.0),  # CLS row (0.4, 0.2) over real tokens -> (2/3, 1/3)
    ({"temperature": 0.5}, 0.8 * 0.5 + 0.2 * 2.0),  # (0.4^2, 0.2^2) -> (0.8, 0.2)
    ({"query": "last"}, 1 / 3 * 0.5 + 2 / 3 * 2.0),  # row of the last real token, query 1: (0.2, 0.4)
    ({"query": "mean"}, 0.5 * 0.5 + 0.5 * 2.0),  # mean of query rows 0 and 1: (0.3, 0.3)
])
def test_instance_feature_weights_tokens_by_teacher_attention(options, expected):
    d = distiller({"name": "instance_feature", "layer_map": {1: 1}, "layer_norm": False, **options},
                  bert(layers=1, **EAGER), bert(layers=1, **EAGER))
    loss, parts = d(view((HS, HS)), view((HT, HT), (ATTENTION,)), {"attention_mask": MASK})
    assert loss.item() == pytest.approx(expected) and parts["layer_1"].item() == pytest.approx(expected)


def test_instance_feature_layer_norm_and_attention_of_the_mapped_layer():
    student, teacher = bert(layers=1, **EAGER), bert(layers=2, **EAGER)
    uniform_cls = torch.full((1, 2, 3, 3), 1 / 3)
    teacher_view = view((HT, HT, HT), (ATTENTION, uniform_cls))
    batch = {"attention_mask": MASK}
    last = distiller({"name": "instance_feature", "layer_map": {1: 1}, "layer_norm": False}, student, teacher)
    assert last(view((HS, HS)), teacher_view, batch)[0].item() == pytest.approx(0.5 * 0.5 + 0.5 * 2.0)
    mapped = distiller({"name": "instance_feature", "layer_map": {1: 1}, "layer_norm": False,
                        "attention_layer": "mapped"}, student, teacher)
    assert mapped(view((HS, HS)), teacher_view, batch)[0].item() == pytest.approx(2 / 3 * 0.5 + 1 / 3 * 2.0)
    # LayerNorm over D=2 maps (a, b) to about (-1, 1) or (1, -1): token 1 agrees (0), token 2 disagrees (MSE 4).
    normed = distiller({"name": "instance_feature", "layer_map": {1: 1}}, student, teacher)
    assert normed(view((HS, HS)), teacher_view, batch)[0].item() == pytest.approx(0.5 * 0.0 + 0.5 * 4.0, rel=1e-4)
    with pytest.raises(ValueError, match="teacher layer 0 \\(embeddings\\) has no attention map"):
        distiller({"name": "instance_feature", "layer_map": {0: 0}, "attention_layer": "mapped"}, student, teacher)


def test_instance_feature_trains_the_projector_to_the_teacher_width():
    d = distiller({"name": "instance_feature"}, bert(layers=2, hidden=32), bert(layers=4, hidden=48))
    assert d.layer_map == {1: 2, 2: 4} and d.projectors["shared"].weight.shape == (48, 32)
    hs = tuple(torch.randn(2, 3, 32) for _ in range(3))
    ht = tuple(torch.randn(2, 3, 48) for _ in range(5))
    attentions = tuple(torch.softmax(torch.randn(2, 2, 3, 3), -1) for _ in range(4))
    loss, parts = d(view(hs), view(ht, attentions), {})
    loss.backward()
    assert sorted(parts) == ["layer_1", "layer_2"] and d.projectors["shared"].weight.grad.abs().sum() > 0


# ---- feature_mixing (DPK) ----------------------------------------------------------------------------------------
def test_feature_mixing_replaces_a_ratio_of_real_tokens_per_sample():
    d = distiller({"name": "feature_mixing", "ratio": 0.5}, bert(), bert())
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    chosen = []
    for step in range(20):
        replaced = d.replace_mask(mask, d.random.generator(step))
        assert replaced.sum(1).tolist() == [2, 3] and not (replaced & (mask == 0)).any()
        chosen.append(replaced)
    assert len({tuple(r.flatten().tolist()) for r in chosen}) > 1  # a new draw each step
    d.ratio = 1.0
    assert torch.equal(d.replace_mask(mask, torch.Generator()), mask.bool())
    d.ratio = 0.0
    assert not d.replace_mask(mask, torch.Generator()).any()


def test_feature_mixing_loss_reconstructs_teacher_on_real_tokens():
    d = distiller({"name": "feature_mixing", "layer_map": {1: 1}, "seed": 0}, bert(layers=1), bert(layers=1))
    d.decoders["1"] = nn.Identity()  # the loss is then the error of the mixed features themselves
    batch = {"attention_mask": MASK}
    losses = {}
    for ratio, expected in ((0.0, (0.5 + 2.0) / 2), (1.0, 0.0)):
        d.ratio = ratio
        losses[ratio] = d(view((HS, HS)), view((HT, HT)), batch)[0].item()
        assert losses[ratio] == pytest.approx(expected)  # padding (error 81) never counts
    d.ratio = 0.5  # one of the two real tokens replaced: loss 2.0 / 2 or 0.5 / 2
    seen = set()
    for step in range(12):
        d.set_progress(step, 12)
        seen.add(round(d(view((HS, HS)), view((HT, HT)), batch)[0].item(), 6))
    assert seen == {1.0, 0.25}
    evaluation = [d(view((HS, HS), training=False), view((HT, HT)), batch)[0].item() for _ in range(4)]
    assert len(set(evaluation)) == 1  # evaluation masks come from the seed alone


@pytest.mark.parametrize("decoder", ["transformer", "mlp"])
def test_feature_mixing_gradients_reach_projector_and_decoder_unless_all_replaced(decoder):
    student, teacher = bert(layers=2, hidden=32), bert(layers=2, hidden=48)
    d = distiller({"name": "feature_mixing", "decoder": decoder, "decoder_width": 16, "layer_map": {2: 2}}, student,
                  teacher)
    assert sorted(d.decoders) == ["2"] and isinstance(d.projectors["shared"], nn.Linear)
    hs = tuple(torch.randn(2, 4, 32) for _ in range(3))
    ht = tuple(torch.randn(2, 4, 48) for _ in range(3))
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}
    d(view(hs), view(ht), batch)[0].backward()
    assert d.projectors["shared"].weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.decoders.parameters() if p.dim() > 1)
    d.zero_grad(set_to_none=True)
    d.ratio = 1.0  # every real token is the teacher's: nothing reaches the student side, padding included
    d(view(hs), view(ht), batch)[0].backward()
    grad = d.projectors["shared"].weight.grad
    assert grad is None or not grad.any()


def test_fraction_knobs_take_schedules_within_zero_and_one():
    d = build_distiller({"name": "feature_mixing", "ratio": {"schedule": "linear", "start": 0.0, "end": 1.0}})
    d.set_progress(5, 10)
    assert d.ratio == pytest.approx(0.5)
    with pytest.raises(ValueError, match="`ratio` must be >= 0 and <= 1.0"):
        build_distiller({"name": "feature_mixing", "ratio": 1.5})
    with pytest.raises(ValueError, match="`swap_prob` must be >= 0 and <= 1.0"):
        build_distiller({"name": "block_swap", "swap_prob": {"schedule": "linear", "start": 0.5, "end": 2.0}})
    with pytest.raises(ValueError, match="`swap_prob` must be >= 0"):
        build_distiller({"name": "block_swap", "swap_prob": -0.1})


# ---- block_swap (IAKD) -------------------------------------------------------------------------------------------
def hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_block_swap_with_p_1_runs_the_hybrid_network():
    student, teacher = bert(layers=2, seed=1), frozen(bert(layers=4, seed=2))
    d = distiller({"name": "block_swap", "swap_prob": 1.0}, student, teacher)
    t_layers = teacher.bert.encoder.layer
    assert {s: [id(m) for m in span] for s, span in d.spans.items()} == {
        1: [id(t_layers[0]), id(t_layers[1])], 2: [id(t_layers[2]), id(t_layers[3])]}  # uniform: 2 teacher layers each
    assert not any(name.startswith("spans") for name, _ in d.named_modules()) and not d.state_dict()
    ids = torch.randint(3, 90, (2, 5))
    for model in (student, teacher):  # transformers installs its recording hooks on first use, as in training
        model(input_ids=ids, output_hidden_states=True, output_attentions=True)
    before = hooks(student)
    with d.student_forward_context(student, training=True):
        out = student(input_ids=ids, output_hidden_states=True)
    assert hooks(student) == before

    with torch.no_grad():  # by hand: student embeddings, teacher layers 1-4, student pooler and classifier
        hand = [student.bert.embeddings(input_ids=ids)]
        for layer in t_layers:
            hand.append(layer(hand[-1]))
        logits = student.classifier(student.bert.pooler(hand[-1]))
    torch.testing.assert_close(out.logits, logits)
    assert len(out.hidden_states) == 3  # the teacher layers' recording hooks added nothing to the student's outputs
    torch.testing.assert_close(out.hidden_states[1], hand[2])
    torch.testing.assert_close(out.hidden_states[2], hand[4])
    loss, parts = d(view(), None, {})
    assert loss.item() == 0.0 and parts["swapped"].item() == 1.0


def test_block_swap_leaves_the_student_alone_at_p_0_and_in_evaluation():
    student, teacher = bert(layers=2, seed=1), frozen(bert(layers=2, seed=2))
    ids = torch.randint(3, 90, (2, 5))
    plain = student(input_ids=ids).logits
    never = distiller({"name": "block_swap", "swap_prob": 0.0}, student, teacher)
    always = distiller({"name": "block_swap", "swap_prob": 1.0}, student, teacher)
    for d, training in ((never, True), (always, False)):
        with d.student_forward_context(student, training=training):
            torch.testing.assert_close(student(input_ids=ids).logits, plain, rtol=0, atol=0)
        assert d(view(), None, {})[1]["swapped"].item() == 0.0
    with always.student_forward_context(student, training=True):
        assert not torch.allclose(student(input_ids=ids).logits, plain)
    torch.testing.assert_close(student(input_ids=ids).logits, plain, rtol=0, atol=0)  # nothing left behind


def test_block_swap_gradients_flow_through_frozen_teacher_to_earlier_student_blocks():
    teacher = frozen(bert(layers=4, seed=2))
    ids = torch.randint(3, 90, (2, 5))
    grads = []
    for checkpointing in (False, True):
        student = bert(layers=2, seed=1)
        if checkpointing:
            student.activation_checkpointing_enable()
        d = distiller({"name": "block_swap", "swap_prob": 1.0, "layer_map": {2: 4}}, student, teacher)
        assert list(d.spans) == [2] and d.spans[2] == [teacher.bert.encoder.layer[3]]  # layer 1 unmapped: one layer
        with d.student_forward_context(student, training=True):
            student(input_ids=ids).logits.sum().backward()
        layers = student.bert.encoder.layer
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].parameters())
        assert all(p.grad is None for p in layers[1].parameters())  # swapped out: its output was discarded
        assert student.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in teacher.parameters())
        grads.append([p.grad for p in layers[0].parameters()])
    assert all(torch.allclose(a, b) for a, b in zip(*grads))  # gradient checkpointing changes nothing


def test_block_swap_draws_are_a_function_of_seed_and_step():
    student, teacher = bert(layers=4, seed=1), frozen(bert(layers=4, seed=2))

    def draws(seed, steps=range(8), per_step=2):
        d = distiller({"name": "block_swap", "swap_prob": 0.5, "seed": seed}, student, teacher)
        fractions = []
        for step in steps:
            d.set_progress(step, 8)
            for _ in range(per_step):  # gradient-accumulation micro-batches of one step
                with d.student_forward_context(student, training=True):
                    fractions.append(d.swapped_fraction)
        return fractions

    first = draws(seed=3)
    assert first == draws(seed=3) and len(set(first)) > 1
    assert draws(seed=3, steps=range(5, 8)) == first[10:]  # resuming at step 5 replays the same swaps
    assert first != draws(seed=4)


@pytest.mark.parametrize("factory", [vit, llama, gpt2])
def test_block_swap_runs_on_other_architectures(factory):
    student, teacher = factory(layers=2, seed=1), frozen(factory(layers=2, seed=2))
    d = distiller({"name": "block_swap", "swap_prob": 1.0}, student, teacher)
    inputs = {"pixel_values": torch.rand(2, 1, 8, 8)} if factory is vit else {"input_ids": torch.randint(3, 90, (2, 5))}
    plain = student(**inputs).logits
    with d.student_forward_context(student, training=True):  # caches dropped, rotary embeddings passed through
        swapped = student(**inputs, output_hidden_states=True)
    assert len(swapped.hidden_states) == 3 and not torch.allclose(swapped.logits, plain)
    torch.testing.assert_close(student(**inputs).logits, plain, rtol=0, atol=0)


def test_block_swap_refuses_blocks_that_cannot_stand_in():
    with pytest.raises(ValueError, match="same hidden size; the student's is 32 and the teacher's 48"):
        distiller({"name": "block_swap"}, bert(), frozen(bert(hidden=48)))
    with pytest.raises(ValueError, match="the student's are BertLayer and the teacher's ViTLayer"):
        distiller({"name": "block_swap"}, bert(), frozen(vit()))
    with pytest.raises(ValueError, match="trainable parameters"):
        distiller({"name": "block_swap"}, bert(), bert())
    with pytest.raises(ValueError, match="teacher's parameters are torch.bfloat16 and the student's torch.float32"):
        distiller({"name": "block_swap"}, bert(), frozen(bert()).to(torch.bfloat16))
    with pytest.raises(ValueError, match="`layer_map` entry 1 -> 0 names no teacher block"):
        distiller({"name": "block_swap"}, bert(layers=4), frozen(bert(layers=2)))  # uniform 4 -> 2 maps 1 -> 0


# ---- in training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [bert, vit])
def test_teacher_guided_distillers_train_and_export_only_the_student(tmp_path, factory):
    student, teacher = factory(seed=1, **EAGER), factory(layers=4, seed=2, **EAGER)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, max_steps=2,
                                 logging_steps=1, save_strategy="no", per_device_train_batch_size=4)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=image_data(8) if factory is vit else text_classification_data(8),
        distillers=[{"name": "instance_feature"}, {"name": "feature_mixing", "decoder_width": 16},
                    {"name": "block_swap", "swap_prob": 1.0}],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert {"loss/instance_feature/layer_1", "loss/feature_mixing/layer_2", "loss/block_swap"} <= logs.keys()
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss/"))
    assert logs["loss/block_swap/swapped"] == 1.0 and logs["loss/block_swap"] == 0.0
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(k.startswith(("1.decoders.", "1.projectors.")) for k in trainer.distillers.state_dict())

    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "student" / "model.safetensors"))  # ViT is saved under its legacy names
    assert len(exported) == len(student.state_dict())
    reloaded = type(student).from_pretrained(str(tmp_path / "student")).state_dict()
    assert reloaded.keys() == student.state_dict().keys()
    assert all(torch.equal(reloaded[k], v) for k, v in student.state_dict().items())

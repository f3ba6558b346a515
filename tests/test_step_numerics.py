"""Numerics of a step: dkd at saturated logits, -inf teacher logits, non-finite losses (raise / skip), the fused head
path's first-batch check, attention KL with a bf16 teacher, left padding, teacher isolation, and composite."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, TrainerCallback

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationArguments, DistillationTrainer, Distiller, Requirements, build_distiller
from hf_kd.capture import ModelView
from hf_kd.distillers import divergences
from hf_kd.distillers.base import CONTRACT_HOOKS
from hf_kd.distillers.composite import CompositeDistiller
from hf_kd.distillers.representation import attention_map_loss
from hf_kd.trainer import DISTILLER_STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def args_for(output_dir, **overrides) -> DistillationArguments:
    return training_args(output_dir, **{"logging_steps": 1, "seed": 0, "max_steps": 2, **overrides})


# ---- dkd -------------------------------------------------------------------------------------------------------
def dkd_reference(student, teacher, target, alpha, beta):
    """Decoupled KD in float64 straight from the definition (probabilities, no logsumexp tricks)."""
    p_s, p_t = student.double().softmax(-1), teacher.double().softmax(-1)
    b_s = torch.stack([p_s[:, target], 1 - p_s[:, target]], -1)
    b_t = torch.stack([p_t[:, target], 1 - p_t[:, target]], -1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(-1)
    keep = [c for c in range(student.shape[-1]) if c != target]
    r_s, r_t = student.double()[:, keep].softmax(-1), teacher.double()[:, keep].softmax(-1)
    nckd = (r_t * (r_t.log() - r_s.log())).sum(-1)
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("student_target, teacher, beta", [
    (-40.0, [10.0, 0.0, -1.0, 2.0], 8.0),   # the student is sure the target is wrong, the teacher confident
    (22.0, [4.0, 1.0, 0.0, 0.0], 0.0),      # an over-confident student, p_t(y) = 0.92, TCKD only
    (0.5, [0.0, 0.3, -0.2, 0.1], 8.0),      # ordinary logits
])
def test_dkd_matches_a_float64_reference_at_extreme_logits(student_target, teacher, beta):
    student = torch.tensor([[student_target, 0.3, -0.7, 1.1]], requires_grad=True)
    teacher = torch.tensor([teacher])
    loss = divergences.decoupled_kd(student, teacher, torch.tensor([0]), 1.0, beta)
    loss.sum().backward()
    reference_input = student.detach().double().requires_grad_()
    reference = dkd_reference(reference_input, teacher, 0, 1.0, beta)
    reference.sum().backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(student.grad.double(), reference_input.grad, rtol=1e-4, atol=1e-6)
    assert math.isfinite(loss.item())


def test_dkd_at_minus_40_has_the_full_gradient_on_the_target_logit():
    student = torch.tensor([[-40.0, 0.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    loss = divergences.decoupled_kd(student, teacher, torch.tensor([0]), 1.0, 8.0)
    loss.sum().backward()
    # TCKD ~ p_t(y) * (log p_t(y) - log p_s(y)) with log p_s(y) = -40 - log 3: about 41.1; its gradient -p_t(y).
    assert loss.item() == pytest.approx(41.09, abs=0.01)
    assert student.grad[0, 0].item() == pytest.approx(-0.9999, abs=1e-3)


# ---- -inf teacher logits -------------------------------------------------------------------------------------------
def test_divergences_take_zero_log_zero_for_masked_teacher_entries():
    student = torch.randn(5, 7, requires_grad=True)
    teacher = torch.randn(5, 7)
    masked = teacher.clone()
    masked[:, :2] = float("-inf")
    support = masked[:, 2:]
    expected = F.kl_div(student.log_softmax(-1)[:, 2:], support.log_softmax(-1), log_target=True,
                        reduction="none").sum(-1)
    kl = divergences.forward_kl(student, masked)
    torch.testing.assert_close(kl, expected)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()
    for fn in (lambda s, t: divergences.generalized_jsd(s, t, 0.5), lambda s, t: divergences.skew_kl(s, t, 0.1),
               lambda s, t: divergences.skew_reverse_kl(s, t, 0.1), divergences.total_variation):
        assert torch.isfinite(fn(student, masked)).all()
    assert torch.isinf(divergences.reverse_kl(student, masked)).all()  # infinite by definition


class MaskingLlama(LlamaForCausalLM):
    """A teacher whose forward() masks some vocabulary entries after the head (e.g. banned tokens)."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits.index_fill(-1, torch.tensor([3, 4, 5, 6]), float("-inf"))
        return outputs


def masking_teacher():
    base = llama(layers=3, seed=2)
    teacher = MaskingLlama(base.config)
    teacher.load_state_dict(base.state_dict())
    return teacher


def test_teacher_that_masks_logits_in_forward_falls_back_from_the_fused_path(tmp_path, caplog):
    data = lm_data(n=8)
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=masking_teacher(), train_dataset=data,
                                  args=args_for(str(tmp_path), max_steps=1, per_device_train_batch_size=8,
                                                hard_label_weight=0.0, learning_rate=0.0),
                                  distillers=[{"name": "kl"}])
    assert trainer._fused_lm
    with caplog.at_level(logging.WARNING, logger="hf_kd.checks"):
        trainer.train()
    assert not trainer._fused_lm
    assert "plain logits path" in caplog.text
    batch = {k: torch.tensor(data[k]) for k in data.column_names}
    with torch.no_grad():
        s = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = trainer.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    valid = batch["labels"][:, 1:] != -100
    expected = divergences.forward_kl(s[:, :-1][valid], t[:, :-1][valid]).mean().item()
    assert trainer.state.log_history[0]["loss/kl"] == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_against_masked_teacher_stops_with_the_reason(tmp_path):
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=masking_teacher(), train_dataset=lm_data(n=8),
                                  args=args_for(str(tmp_path), max_steps=1, hard_label_weight=0.0),
                                  distillers=[{"name": "reverse_kl"}])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"reverse_kl.*-inf at some entries.*use kl, jsd"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


# ---- non-finite losses -------------------------------------------------------------------------------------------
def test_fp16_teacher_overflow_names_teacher_dtype(tmp_path):
    teacher = llama(layers=3, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(1e6)
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=teacher, train_dataset=lm_data(n=8),
                                  args=args_for(str(tmp_path), teacher_dtype="float16", hard_label_weight=0.0),
                                  distillers=[{"name": "kl"}])
    with pytest.raises(FloatingPointError, match=r"fp16 overflow\? Use teacher_dtype='bfloat16'"):
        trainer.train()


class NaNAtStep(Distiller):
    """A per-sample logit MSE that is NaN at one optimizer step."""

    requires = Requirements(logits=True)
    name = "nan_at_step"

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def forward(self, student, teacher, batch):
        loss = (student.logits - teacher.logits).pow(2).mean()
        return loss * float("nan") if self.global_step == self.step else loss


def test_nan_loss_stops_before_the_optimizer_step_naming_the_component(tmp_path):
    student = bert(seed=1)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher_model=bert(seed=2), args=args_for(str(tmp_path)),
                                  train_dataset=text_classification_data(n=8), distillers=[NaNAtStep(step=0)])
    with pytest.raises(FloatingPointError, match=r"not finite at step 0: component\(s\) nan_at_step\..*"
                                                 r"nonfinite_loss='skip_step'"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())


def test_skip_step_leaves_the_weights_untouched_and_counts_the_step(tmp_path):
    student = bert(seed=1)
    snapshots = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({n: p.detach().clone() for n, p in student.named_parameters()})

    trainer = DistillationTrainer(model=student, teacher_model=bert(seed=2),
                                  train_dataset=text_classification_data(n=16),
                                  args=args_for(str(tmp_path), max_steps=3, nonfinite_loss="skip_step",
                                                save_strategy="steps", save_steps=3),
                                  distillers=[NaNAtStep(step=1)], callbacks=[Record()])
    trainer.train()
    unchanged = all(torch.equal(snapshots[1][n], snapshots[0][n]) for n in snapshots[0])
    assert unchanged, "the skipped step must not update the student"
    assert any(not torch.equal(snapshots[2][n], snapshots[1][n]) for n in snapshots[0])
    assert trainer._nonfinite.skipped_steps == 1
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert logged[1]["skipped_steps"] == 1
    assert all(math.isfinite(log["loss/nan_at_step"]) for log in logged if "loss/nan_at_step" in log)
    assert all(torch.isfinite(p).all() for p in student.parameters())


# ---- attention maps in bf16 --------------------------------------------------------------------------------------
def test_attention_kl_is_non_negative_with_a_bf16_teacher():
    torch.manual_seed(0)
    a_s = torch.randn(4, 2, 16, 16).softmax(-1)
    a_t = (a_s + 1e-3 * torch.randn_like(a_s)).softmax(-1).bfloat16()  # rows sum to 1 +- bf16 rounding
    values = attention_map_loss(a_s, a_t, None, "kl")
    assert values.shape == (4, 16)
    assert values.min() >= 0


# ---- left padding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_is_the_last_non_padding_token_on_either_side(side):
    student_model, teacher_model = llama(seed=1), llama(layers=3, seed=2)
    d = build_distiller({"name": "hidden_states", "tokens": "last", "layer_map": {2: 3}})
    d.setup(student_model, teacher_model)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    if side == "left":
        mask = mask.flip(-1)
    last = torch.tensor([2, 4]) if side == "right" else torch.tensor([4, 4])
    h_s, h_t = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    views = [ModelView(model=m, task="causal_lm", hidden_states=(torch.zeros_like(h),) * k + (h,))
             for m, k, h in ((student_model, 2, h_s), (teacher_model, 3, h_t))]
    loss, _ = d(*views, {"attention_mask": mask})
    rows = torch.arange(2)
    expected = (h_s[rows, last] - h_t[rows, last]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    instance = build_distiller({"name": "instance_feature", "query": "last"})
    attention = torch.rand(2, 2, 5, 5).softmax(-1)
    weights = instance.position_weights(attention, mask.float())
    expected_row = attention.mean(1)[rows, last] * mask
    torch.testing.assert_close(weights, expected_row / expected_row.sum(-1, keepdim=True))


# ---- teacher isolation -------------------------------------------------------------------------------------------
def test_kl_beside_dualde_stage_1_leaves_the_teacher_bitwise_unchanged(tmp_path):
    teacher = bert(seed=2)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=teacher, train_dataset=text_classification_data(),
                                  args=args_for(str(tmp_path), max_steps=3, learning_rate=1e-1),
                                  distillers=[{"name": "kl"}, {"name": "dualde", "stage2_step": 100}])
    assert not trainer._slots[0].frozen  # dualde declared teacher parameters: the teacher runs with autograd
    trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())


def test_detached_view_carries_no_history():
    logits = torch.randn(2, 3, requires_grad=True) * 2
    view = ModelView(model=torch.nn.Linear(1, 1), task="classification", logits=logits,
                     hidden_states=(logits.unsqueeze(1),), features={"f": logits})
    cut = view.detached()
    assert not cut.logits.requires_grad and not cut.hidden_states[0].requires_grad
    assert not cut.features["f"].requires_grad and view.logits.requires_grad


# ---- composite ---------------------------------------------------------------------------------------------------
def test_composite_serves_every_hook_of_the_contract():
    overridable = {name for name, value in vars(Distiller).items()
                   if callable(value) and not name.startswith("_")} - {"forward", "schedulable", "extra_repr"}
    assert overridable == set(CONTRACT_HOOKS), "list every new hook in base.CONTRACT_HOOKS"
    for hook in CONTRACT_HOOKS:
        assert getattr(CompositeDistiller, hook) is not getattr(Distiller, hook), hook


def test_composite_refuses_children_it_cannot_serve():
    with pytest.raises(ValueError, match="reads every teacher; list it beside the composite"):
        CompositeDistiller({"a": {"name": "atsc"}})
    with pytest.raises(ValueError, match="set `teacher` on the composite"):
        CompositeDistiller({"a": {"name": "kl", "teacher": 1}})


def test_composite_holding_sokd_trains_and_saves(tmp_path):
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=bert(layers=3, seed=2), train_dataset=text_classification_data(),
        args=args_for(str(tmp_path), max_steps=2, save_strategy="steps", save_steps=2),
        distillers=[{"name": "composite", "components": {"sokd": {"name": "sokd"}, "kl": {"name": "kl"}}}],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert math.isfinite(logs["loss/composite/sokd"]) and math.isfinite(logs["loss/composite/sokd/branch_ce"])
    state = torch.load(tmp_path / "checkpoint-2" / DISTILLER_STATE_NAME, weights_only=True)
    assert any(".branch." in key for key in state)


def test_composite_logit_child_equals_the_shared_row_pass_under_accumulation(tmp_path):
    trainer = DistillationTrainer(
        model=llama(seed=1), teacher_model=llama(layers=3, seed=2), train_dataset=lm_data(n=8),
        args=args_for(str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4),
        distillers=[{"name": "kl", "temperature": 2.0},
                    {"name": "composite", "components": {"kl": {"name": "kl", "temperature": 2.0}}}],
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss/composite/kl"] == pytest.approx(logs["loss/kl"], rel=1e-6)
    assert logs["loss/composite"] == pytest.approx(logs["loss/kl"], rel=1e-6)


def test_a_term_that_swamps_the_others_is_named_once(tmp_path, caplog):
    trainer = DistillationTrainer(
        model=llama(seed=1), teacher_model=llama(layers=3, hidden=48, seed=2), train_dataset=lm_data(n=8),
        args=args_for(str(tmp_path), max_steps=2, learning_rate=0.0),
        distillers=[{"name": "kl"}, {"name": "hidden_states", "weight": 1e6, "projector": "linear"}],
    )
    with caplog.at_level(logging.WARNING, logger="hf_kd.checks"):
        trainer.train()
    assert caplog.text.count("The weighted term 'hidden_states'") == 1 and "loss='cosine'" in caplog.text

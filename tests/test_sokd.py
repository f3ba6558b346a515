"""SOKD (semi-online KD): the auxiliary branch on the frozen teacher, its losses, gradients and checkpoints."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from conftest import bert, frozen, image_data, llama, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller
from hf_kd.capture import ModelView
from hf_kd.distillers.divergences import tempered_kl
from hf_kd.distillers.sokd import SOKDDistiller


def sokd(student, teacher, **options):
    d = build_distiller({"name": "sokd", **options})
    d.setup(student, teacher)
    return d


def inputs_for(factory):
    g = torch.Generator().manual_seed(3)
    if factory is vit:
        return {"pixel_values": torch.rand(3, 1, 8, 8, generator=g)}
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 7])
    return {"input_ids": torch.randint(3, 90, (3, 7), generator=g), "attention_mask": mask}


def teacher_view(teacher, inputs, distiller, grad=False):
    """The teacher's forward as the trainer runs it: inside the distiller's teacher_forward_context."""
    with torch.enable_grad() if grad else torch.inference_mode(), distiller.teacher_forward_context(teacher, False):
        logits = teacher(**inputs).logits
    return ModelView(model=teacher, task="classification", logits=logits if grad else logits.clone())


def hand_kl(a, b, tau):
    """tau^2 KL(softmax(b/tau) || softmax(a/tau)) for one row, in plain Python."""
    def softmax(z):
        e = [math.exp(v / tau) for v in z]
        return [v / sum(e) for v in e]
    p, q = softmax(b), softmax(a)
    return tau * tau * sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


# ---- losses on hand-made logits ----------------------------------------------------------------------------------
Z_S = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
Z_T = [[0.0, 3.0, 0.0], [1.0, -1.0, 2.0]]
Z_A = [[1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]]
LABELS = [1, 2]


def test_tempered_kl_is_tau_squared_kl_of_the_target_over_the_learner():
    expected = sum(hand_kl(a, b, 4.0) for a, b in zip(Z_A, Z_T)) / 2
    assert tempered_kl(torch.tensor(Z_A), torch.tensor(Z_T), 4.0).mean().item() == pytest.approx(expected, rel=1e-5)


def test_student_and_branch_losses_match_hand_computation():
    options = {"temperature": 2.0, "kd_weight": 0.5, "branch_ce_weight": 2.0, "branch_teacher_weight": 3.0,
               "branch_student_weight": 0.25}
    d = sokd(bert(), frozen(bert(layers=3)), **options)
    d.branch_logits = lambda teacher, batch=None: torch.tensor(Z_A)  # the branch itself is tested below
    student = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(Z_S))
    teacher = ModelView(model=nn.Identity(), task="classification", logits=torch.tensor(Z_T))
    loss, parts = d(student, teacher, {"labels": torch.tensor(LABELS)})

    mean = lambda values: sum(values) / len(values)  # noqa: E731
    student_kd = mean([hand_kl(s, a, 2.0) for s, a in zip(Z_S, Z_A)])
    kd_teacher = mean([hand_kl(a, t, 2.0) for a, t in zip(Z_A, Z_T)])
    kd_student = mean([hand_kl(a, s, 2.0) for a, s in zip(Z_A, Z_S)])
    ce = mean([math.log(sum(math.exp(v) for v in a)) - a[y] for a, y in zip(Z_A, LABELS)])
    assert parts["student_kd"].item() == pytest.approx(student_kd, rel=1e-5)
    assert parts["branch_kd_teacher"].item() == pytest.approx(kd_teacher, rel=1e-5)
    assert parts["branch_kd_student"].item() == pytest.approx(kd_student, rel=1e-5)
    assert parts["branch_ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["branch_accuracy"].item() == 0.5  # argmax (0, 2) vs labels (1, 2); first-row tie picks class 0
    expected = 0.5 * student_kd + 2.0 * ce + 3.0 * kd_teacher + 0.25 * kd_student
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ---- the branch --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("factory", [bert, vit])
def test_branch_at_initialisation_reproduces_the_teacher_logits(factory, k):
    teacher = frozen(factory(layers=3, seed=2))
    d = sokd(factory(seed=1), teacher, k=k)
    inputs = inputs_for(factory)
    view = teacher_view(teacher, inputs, d)
    assert len(d.branch["layers"]) == k
    assert torch.equal(d.branch_logits(view, inputs), view.logits)
    # a copy, not the teacher's modules: trainable, and no parameter shared with the teacher
    assert all(p.requires_grad for p in d.parameters())
    assert not {id(p) for p in d.parameters()} & {id(p) for p in teacher.parameters()}


def test_gradients_reach_neither_the_teacher_nor_the_branch_from_the_student_term():
    student, teacher = bert(seed=1), bert(layers=3, seed=2)  # teacher left trainable: nothing may reach it anyway
    d = sokd(student, teacher)
    inputs = inputs_for(bert)
    s_view = ModelView(model=student, task="classification", logits=student(**inputs).logits)
    loss, parts = d(s_view, teacher_view(teacher, inputs, d, grad=True), {**inputs, "labels": torch.tensor([0, 1, 2])})
    branch, student_params = list(d.parameters()), list(student.parameters())
    from_student_term = torch.autograd.grad(parts["student_kd"], branch + student_params, allow_unused=True,
                                            retain_graph=True)
    assert all(g is None for g in from_student_term[: len(branch)])
    assert any(g is not None and g.abs().sum() > 0 for g in from_student_term[len(branch):])
    branch_terms = parts["branch_ce"] + parts["branch_kd_teacher"] + parts["branch_kd_student"]
    from_branch_terms = torch.autograd.grad(branch_terms, branch + student_params, allow_unused=True,
                                            retain_graph=True)
    assert all(g is None for g in from_branch_terms[len(branch):])
    assert sum(g.abs().sum() for g in from_branch_terms[: len(branch)] if g is not None) > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_the_recording_hook_exists_only_during_the_teacher_forward():
    teacher = frozen(bert(layers=3, seed=2))
    block = teacher.bert.encoder.layer[2]
    before = len(block._forward_pre_hooks)
    d = sokd(bert(), teacher)
    assert len(block._forward_pre_hooks) == before
    with d.teacher_forward_context(teacher, True):
        assert len(block._forward_pre_hooks) == before + 1
    assert len(block._forward_pre_hooks) == before
    inputs = inputs_for(bert)
    view = teacher_view(teacher, inputs, d)
    assert torch.equal(d.branch_logits(view, inputs), view.logits)


def test_setup_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        sokd(llama(), frozen(llama()))
    with pytest.raises(ValueError, match="`k`=4 but the teacher BertForSequenceClassification has 3 blocks"):
        sokd(bert(), frozen(bert(layers=3)), k=4)
    with pytest.raises(ValueError, match="integer >= 1"):
        build_distiller({"name": "sokd", "k": 0})
    with pytest.raises(ValueError, match="temperature"):
        build_distiller({"name": "sokd", "temperature": 0.0})


# ---- in training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [bert, vit])
def test_sokd_trains_the_branch_checkpoints_it_and_exports_only_the_student(tmp_path, factory):
    student, teacher = factory(seed=1), factory(layers=3, seed=2)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = image_data(8) if factory is vit else text_classification_data(8)
    args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True, max_steps=3,
                                 logging_steps=1, save_strategy="steps", save_steps=3, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, learning_rate=1e-2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  eval_dataset=data, distillers=[{"name": "sokd", "k": 2}])
    d = trainer.distillers[0]
    branch_before = {k: v.clone() for k, v in d.state_dict().items()}
    trainer.train()

    first = trainer.state.log_history[0]
    assert {"loss/sokd/student_kd", "loss/sokd/branch_ce", "loss/sokd/branch_kd_student"} <= first.keys()
    assert first["loss/sokd/branch_kd_teacher"] == pytest.approx(0.0, abs=1e-5)  # branch == teacher at step 0
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(v, branch_before[k]) for k, v in d.state_dict().items())

    saved = torch.load(os.path.join(str(tmp_path), "checkpoint-3", "distillers.pt"), weights_only=True)
    assert saved.keys() == {f"0.{k}" for k in d.state_dict()}
    assert any(k.startswith("0.branch.layers.1.") for k in saved)
    assert all(torch.equal(saved[f"0.{k}"], v) for k, v in d.state_dict().items())

    resumed = DistillationTrainer(model=factory(seed=1), teacher_model=teacher, args=args, train_dataset=data,
                                  distillers=[{"name": "sokd", "k": 2}])
    resumed.train(resume_from_checkpoint=os.path.join(str(tmp_path), "checkpoint-3"))
    assert all(torch.equal(v, d.state_dict()[k]) for k, v in resumed.distillers[0].state_dict().items())

    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_loss/sokd/branch_accuracy"] <= 1.0
    assert math.isfinite(metrics["eval_loss/sokd/branch_kd_teacher"])

    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "student" / "model.safetensors"))
    assert len(exported) == len(student.state_dict())
    reloaded = type(student).from_pretrained(str(tmp_path / "student")).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in student.state_dict().items())


def test_sokd_is_registered():
    assert isinstance(build_distiller({"name": "sokd"}), SOKDDistiller)

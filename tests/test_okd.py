"""okd: LoRA adapters injected into the teacher learn beside the student; the teacher's weights never change."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")

from conftest import gpt2, llama, lm_data  # noqa: E402
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller  # noqa: E402
from hf_kd.distillers.okd import OKDDistiller  # noqa: E402,F401  (registers "okd")
from hf_kd.trainer import TEACHER_STATE_NAME  # noqa: E402


def _kl(p_logits, q_logits):  # KL(p || q) per row, by hand
    p = p_logits.softmax(-1)
    return (p * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)


def test_row_loss_pieces_match_hand_computation():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(0, 7, (5,))
    d = build_distiller({"name": "okd", "temperature": 2.0, "module_weight": 0.5, "module_ce_weight": 0.7})
    student = 4.0 * _kl(t / 2, s / 2)
    module = 0.7 * F.cross_entropy(t, y, reduction="none") + 0.5 * 4.0 * _kl(s / 2, t / 2)
    torch.testing.assert_close(d.student_term(s, t), student)
    torch.testing.assert_close(d.module_term(s, t, y), module)
    torch.testing.assert_close(d.row_loss(s, t, y), student + module)

    skew = build_distiller({"name": "okd", "divergence": "skew_kl", "alpha": 0.2})
    mix = (0.2 * t.softmax(-1) + 0.8 * s.softmax(-1)).log()
    expected = (t.softmax(-1) * (t.log_softmax(-1) - mix)).sum(-1)
    torch.testing.assert_close(skew.student_term(s, t), expected)
    with pytest.raises(ValueError, match="labels"):
        d.row_loss(s, t, None)
    with pytest.raises(ValueError, match="divergence"):
        build_distiller({"name": "okd", "divergence": "tvd"})


def test_gradients_of_each_side_reach_only_their_own_model():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    y = torch.randint(0, 6, (4,))
    d = build_distiller({"name": "okd", "temperature": 2.0})
    g_s, g_t = torch.autograd.grad(d.student_term(s, t).sum(), (s, t), allow_unused=True)
    assert g_t is None and g_s.abs().sum() > 0
    g_s, g_t = torch.autograd.grad(d.module_term(s, t, y).sum(), (s, t), allow_unused=True)
    assert g_s is None and g_t.abs().sum() > 0
    # The whole row loss: student grad == grad of the student term alone, teacher grad == the module term's.
    g_s, g_t = torch.autograd.grad(d.row_loss(s, t, y).sum(), (s, t))
    torch.testing.assert_close(g_s, torch.autograd.grad(d.student_term(s, t).sum(), s)[0])
    torch.testing.assert_close(g_t, torch.autograd.grad(d.module_term(s, t, y).sum(), t)[0])


def _train(output_dir, make, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 3, "learning_rate": 1e-2,
        "teacher_learning_rate": 5e-2, **overrides})
    student, teacher = make(layers=1, seed=1), make(layers=2, seed=2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_data(),
                                  distillers=[{"name": "okd", "temperature": 2.0}])
    return trainer, student, teacher


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_training_moves_the_adapters_and_the_student_but_never_the_teacher_weights(tmp_path, make):
    trainer, student, teacher = _train(str(tmp_path), make, save_strategy="steps", save_steps=3)
    distiller = trainer.distillers[0]
    lora = {n: p for n, p in teacher.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in lora.values()} == {id(p) for p in distiller.teacher_parameters()}
    base_before = {n: p.detach().clone() for n, p in teacher.named_parameters() if n not in lora}
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    student_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    assert not any(p.requires_grad for n, p in teacher.named_parameters() if n not in lora)

    trainer.train()

    for name, value in base_before.items():  # bitwise: the teacher's own weights never change
        assert torch.equal(value, dict(teacher.named_parameters())[name]), name
    assert all(not torch.equal(lora_before[n], p) for n, p in lora.items() if ".lora_B." in n)
    assert any(not torch.equal(lora_before[n], p) for n, p in lora.items() if ".lora_A." in n)
    assert any(not torch.equal(v, dict(student.named_parameters())[n]) for n, v in student_before.items())
    group = trainer.optimizer.param_groups[-1]
    assert {id(p) for p in group["params"]} == {id(p) for p in lora.values()}
    assert group["initial_lr"] == 5e-2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)

    saved = torch.load(os.path.join(str(tmp_path), "checkpoint-3", TEACHER_STATE_NAME))
    assert sorted(saved) == sorted(lora)
    for name, value in saved.items():
        assert torch.equal(value, lora[name])

    if make is llama:  # the exported model is the plain student
        from transformers import AutoModelForCausalLM

        export = str(tmp_path / "student")
        trainer.save_model(export)
        assert not os.path.exists(os.path.join(export, TEACHER_STATE_NAME))
        reloaded = AutoModelForCausalLM.from_pretrained(export)
        assert not any("lora" in n for n, _ in reloaded.named_parameters())
        ids = torch.tensor(lm_data(n=2)["input_ids"])
        student.eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, student(ids).logits, rtol=0, atol=0)


def test_adapters_export_in_peft_format(tmp_path):
    from peft import PeftModel

    trainer, _, teacher = _train(str(tmp_path), llama, max_steps=2)
    trainer.train()
    trainer.distillers[0].save_teacher_adapters(str(tmp_path / "adapters"))
    assert os.path.isfile(tmp_path / "adapters" / "adapter_model.safetensors")
    fresh = PeftModel.from_pretrained(llama(layers=2, seed=2), str(tmp_path / "adapters"), adapter_name="okd").eval()
    ids = torch.tensor(lm_data(n=2)["input_ids"])
    teacher.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, teacher(ids).logits)
        assert not torch.allclose(llama(layers=2, seed=2)(ids).logits, teacher(ids).logits)  # the adapters matter


def test_student_update_equals_plain_kl_while_the_adapters_are_still_zero(tmp_path):
    # Step 1: lora_B = 0, so p_T' = p_T and the student's gradient must be exactly that of `kl` (no module term).
    def one_step(distiller, **overrides):
        args = DistillationArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True,
                                     save_strategy="no", per_device_train_batch_size=4, max_steps=1,
                                     learning_rate=1e-2, **overrides)
        student = llama(layers=1, seed=1)
        DistillationTrainer(model=student, teacher_model=llama(layers=2, seed=2), args=args, train_dataset=lm_data(),
                            distillers=[distiller]).train()
        return dict(student.named_parameters())

    plain = one_step({"name": "kl", "temperature": 2.0})
    okd = one_step({"name": "okd", "temperature": 2.0, "module_weight": 3.0})
    chunked = one_step({"name": "okd", "temperature": 2.0, "module_weight": 3.0}, loss_chunk_size=5)
    for name, value in plain.items():
        torch.testing.assert_close(okd[name], value, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked[name], value, rtol=1e-5, atol=1e-6)


def test_chunked_row_pass_trains_the_adapters_like_the_unchunked_one(tmp_path):
    results = []
    for chunk in (None, 5):
        trainer, student, teacher = _train(str(tmp_path / str(chunk)), llama, loss_chunk_size=chunk)
        trainer.train()
        results.append(({n: p.detach() for n, p in teacher.named_parameters() if "lora_" in n},
                        [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (lora_a, loss_a), (lora_b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name, value in lora_a.items():
        torch.testing.assert_close(lora_b[name], value, rtol=1e-4, atol=1e-6)


def test_low_precision_teacher_gets_fp32_adapters(tmp_path):
    trainer, _, teacher = _train(str(tmp_path), llama, max_steps=2, teacher_dtype="bfloat16")
    lora_b = {n: p.detach().clone() for n, p in teacher.named_parameters() if ".lora_B." in n}
    trainer.train()
    assert {p.dtype for p in trainer.distillers[0].teacher_parameters()} == {torch.float32}
    assert trainer.teacher.model.embed_tokens.weight.dtype == torch.bfloat16
    params = dict(teacher.named_parameters())
    assert all(not torch.equal(value, params[name]) for name, value in lora_b.items())

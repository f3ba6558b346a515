"""On-policy (lmbda) and sequence-level (seq_kd) distillation of causal LMs, and prompt / completion data.

The loss of a fixed generated batch equals TRL's ``generalized_jsd_loss`` on the same sequences; the prompt and the
padding carry no loss; lmbda=0 is today's path exactly; lmbda=1 generates with the student every step, seq_kd with
the teacher; seeded generation repeats, also across a resume; a generated batch is packed with right padding."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import EOS, PAD, Ids, bert, llama, prompt_data, training_args
from hf_kd import DistillationTrainer, PromptCompletionCollator, tokenize_prompts
from hf_kd.distillers.base import _REGISTRY
from hf_kd.on_policy import completion_source, packed


def trainer_for(tmp_path, distillers=({"name": "jsd", "beta": 0.5},), data=None, **overrides):
    defaults = dict(max_steps=3, logging_steps=1, hard_label_weight=0.0, max_new_tokens=5, seed=0)
    return DistillationTrainer(model=llama(seed=1), teacher_model=llama(layers=3, seed=2),
                               args=training_args(tmp_path, **{**defaults, **overrides}),
                               train_dataset=data if data is not None else prompt_data(),
                               data_collator=PromptCompletionCollator(PAD), distillers=list(distillers))


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def jsd_by_hand(student, teacher, beta):
    """JSD_beta of GKD (Agarwal et al. 2024, eq. 1), TRL's convention: beta=0 forward KL(p_t || p_s), beta=1 reverse
    KL(p_s || p_t), else beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = beta p_t + (1 - beta) p_s; per row."""
    p_s, p_t = student.softmax(-1), teacher.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    mixture = beta * p_t + (1 - beta) * p_s
    return beta * kl(p_t, mixture) + (1 - beta) * kl(p_s, mixture)


def a_generated_batch():
    """Two prompts (left-padded) and completions with an EOS and what follows it, packed."""
    prompts = torch.tensor([[PAD, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completions = torch.tensor([[12, 13, EOS, 14], [15, EOS, 16, 17]])
    kept = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]).bool()
    return packed(prompts, mask, completions, kept, PAD)


def test_packing_puts_prompt_then_completion_on_the_left_and_labels_the_completion_only():
    batch = a_generated_batch()
    assert batch["input_ids"].tolist() == [[5, 6, 7, 12, 13, EOS], [8, 9, 10, 11, 15, EOS]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 12, 13, EOS], [-100, -100, -100, -100, 15, EOS]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 6]


def test_collator_masks_prompt_and_padding_and_left_pads_the_prompts():
    data = tokenize_prompts(Dataset.from_list([{"prompt": [5, 6], "completion": [7]},
                                               {"prompt": [8, 9, 10], "completion": [11, 12, EOS]}]), Ids())
    assert data["input_ids"] == [[5, 6, 7, EOS], [8, 9, 10, 11, 12, EOS]]  # EOS added once
    cut = tokenize_prompts(Dataset.from_list([{"prompt": [8, 9, 10], "completion": [11, 12]}]), Ids(),
                           max_prompt_length=2, max_completion_length=2)
    assert cut[0] == {"input_ids": [9, 10, 11, 12], "prompt_length": 2}  # the prompt's end, the completion's start
    batch = PromptCompletionCollator(PAD)(list(data))
    assert batch["labels"].tolist() == [[-100, -100, 7, EOS, -100, -100], [-100, -100, -100, 11, 12, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["prompt_input_ids"].tolist() == [[PAD, 5, 6], [8, 9, 10]]
    assert batch["prompt_attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def word_tokenizer():
    words = ["[PAD]", "[BOS]", "[EOS]", "user:", "assistant:", "hi", "there", "how", "are", "you"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


def test_chat_messages_train_on_the_last_assistant_message():
    tokenizer = word_tokenizer()
    data = tokenize_prompts(Dataset.from_list([{"messages": [{"role": "user", "content": "how are you"},
                                                             {"role": "assistant", "content": "hi there"}]}]),
                            tokenizer)
    ids, start = data[0]["input_ids"], data[0]["prompt_length"]
    assert tokenizer.convert_ids_to_tokens(ids[:start]) == ["user:", "how", "are", "you", "assistant:"]
    assert tokenizer.convert_ids_to_tokens(ids[start:]) == ["hi", "there", "[EOS]"]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_fixed_generated_batch_scores_as_trl_generalized_jsd(tmp_path, beta):
    trainer = trainer_for(tmp_path, distillers=[{"name": "jsd", "beta": beta, "temperature": 1.0}],
                          fused_lm_loss=False)
    batch = a_generated_batch()
    student, teacher = trainer.model.train(), trainer.teacher
    loss = trainer.compute_loss(student, dict(batch))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]  # position i predicts token i + 1
    mask = labels != -100
    torch.testing.assert_close(loss.detach(), jsd_by_hand(s[mask], t[mask], beta).mean(), rtol=1e-5, atol=1e-7)
    trl = pytest.importorskip("trl.experimental.gkd")
    reference = trl.GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.0)
    torch.testing.assert_close(loss.detach(), reference, rtol=1e-5, atol=1e-7)


def test_prompt_tokens_and_padding_carry_no_loss(tmp_path):
    """Changing a prompt-only position's target or the padding changes nothing; a completion token does."""
    trainer = trainer_for(tmp_path, fused_lm_loss=False)
    student = trainer.model.train()
    base = {**PromptCompletionCollator(PAD)(list(prompt_data(4)))}
    loss = trainer.compute_loss(student, dict(base)).item()
    padded = {k: v.clone() for k, v in base.items()}
    padded["input_ids"][padded["attention_mask"] == 0] = 33  # other padding tokens: masked out
    assert trainer.compute_loss(student, padded).item() == pytest.approx(loss, abs=1e-7)
    changed = {k: v.clone() for k, v in base.items()}
    first = int((changed["labels"][0] != -100).nonzero()[0])
    changed["input_ids"][0, first] = 44  # the first completion token: the input of the next predictions
    assert trainer.compute_loss(student, changed).item() != pytest.approx(loss, abs=1e-7)
    no_completion = {**base, "labels": torch.full_like(base["labels"], -100)}  # a prompt carries no loss
    assert trainer.compute_loss(student, no_completion).item() == 0.0


def test_lmbda_0_is_todays_path(tmp_path):
    plain = trainer_for(tmp_path / "plain")
    plain.train()
    off = trainer_for(tmp_path / "off", lmbda=0.0, seq_kd=False)
    off.train()
    assert off._completions is None and losses(off) == losses(plain)
    assert not any(k.startswith("on_policy/") for entry in off.state.log_history for k in entry)


def test_lmbda_1_generates_with_the_student_every_step_and_seq_kd_with_the_teacher(tmp_path):
    on = trainer_for(tmp_path / "on", lmbda=1.0, gradient_accumulation_steps=2)
    on.train()
    assert on._completions.generate_calls == {"student": 6, "teacher": 0}  # 3 steps x 2 micro-batches
    logs = [entry for entry in on.state.log_history if "loss" in entry]
    assert all(entry["on_policy/student_share"] == 1.0 and 0 < entry["on_policy/generated_length"] <= 5
               for entry in logs)
    seq = trainer_for(tmp_path / "seq", seq_kd=True)
    seq.train()
    assert seq._completions.generate_calls == {"student": 0, "teacher": 3}
    half = trainer_for(tmp_path / "half", lmbda=0.5, seq_kd=True, max_steps=8)
    half.train()
    calls = half._completions.generate_calls
    assert calls["student"] + calls["teacher"] == 8 and 0 < calls["student"] < 8  # the coin, once per step


def test_seeded_generation_repeats_and_a_resumed_run_continues_exactly(tmp_path):
    args = dict(lmbda=1.0, max_steps=4, save_strategy="steps", save_steps=2, generation_temperature=1.0)
    first = trainer_for(tmp_path / "a", **args)
    first.train()
    again = trainer_for(tmp_path / "b", **args)
    again.train()
    assert losses(first) == losses(again)
    resumed = trainer_for(tmp_path / "a", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert losses(resumed)[-2:] == pytest.approx(losses(first)[-2:], rel=1e-6)
    other_seed = trainer_for(tmp_path / "c", **{**args, "seed": 1})
    other_seed.train()
    assert losses(other_seed) != losses(first)


def test_prompt_only_data_trains_on_generated_completions_and_is_refused_off_policy(tmp_path):
    data = prompt_data(with_completion=False)
    on = trainer_for(tmp_path / "on", data=data, lmbda=1.0)
    on.train()
    assert all(loss > 0 for loss in losses(on))
    with pytest.raises(ValueError, match="prompts without completions, and lmbda=0.5"):  # when the trainer is built
        trainer_for(tmp_path / "off", data=data, lmbda=0.5)
    with pytest.raises(ValueError, match="prompts without completions, and lmbda=0.0"):
        trainer_for(tmp_path / "plain", data=data)
    late = trainer_for(tmp_path / "late", data=prompt_data(), lmbda=0.5, max_steps=20)
    late.train_dataset = data  # rows found prompt-only only in training: the step that needs them stops
    with pytest.raises(ValueError, match="no completion"):
        late.train()


def test_settings_are_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="lmbda"):
        training_args(tmp_path, lmbda=1.5)
    with pytest.raises(ValueError, match="generation_temperature"):
        training_args(tmp_path, generation_temperature=-1.0)
    with pytest.raises(ValueError, match="causal-LM student"):
        DistillationTrainer(model=bert(seed=1), teacher_model=bert(seed=2), args=training_args(tmp_path, lmbda=1.0))
    with pytest.raises(ValueError, match="seq_kd=True.*teacher"):
        completion_source(training_args(tmp_path, seq_kd=True), llama(), "causal_lm", [], cached=False,
                          sharded=False)
    with pytest.raises(ValueError, match="sharded teacher"):
        completion_source(training_args(tmp_path, seq_kd=True), llama(), "causal_lm", [llama()], cached=False,
                          sharded=True)
    with pytest.raises(ValueError, match="teacher cache"):
        completion_source(training_args(tmp_path, lmbda=0.5), llama(), "causal_lm", [], cached=True, sharded=False)
    with pytest.raises(ValueError, match="eos_token_id"):
        no_eos = llama()
        no_eos.generation_config.eos_token_id = no_eos.generation_config.pad_token_id = None
        completion_source(training_args(tmp_path, lmbda=0.5), no_eos, "causal_lm", [], cached=False, sharded=False)
    trainer = trainer_for(tmp_path, data=Dataset.from_dict({"input_ids": [[5, 6, 7]] * 8}), lmbda=1.0)
    trainer.data_collator = lambda rows: {"input_ids": torch.tensor([r["input_ids"] for r in rows]),
                                          "labels": torch.tensor([r["input_ids"] for r in rows])}
    with pytest.raises(ValueError, match="tokenize_prompts"):
        trainer.train()


def test_the_loss_temperature_is_not_the_sampling_temperature(tmp_path):
    """generation_temperature changes what is sampled, not what is scored; the distiller's temperature the other
    way round."""
    def run(name, **overrides):
        trainer = trainer_for(tmp_path / name, lmbda=1.0, max_steps=1, **overrides)
        sequences, complete = [], trainer._completions.complete

        def recorded(*args):
            batches = complete(*args)
            sequences.extend(batch["input_ids"] for batch in batches)
            return batches

        trainer._completions.complete = recorded
        trainer.train()
        return losses(trainer), sequences

    greedy_t1, greedy = run("t1", generation_temperature=0.0)
    greedy_t2, greedy_again = run("t2", generation_temperature=0.0,
                                  distillers=[{"name": "jsd", "beta": 0.5, "temperature": 2.0}])
    assert all(torch.equal(a, b) for a, b in zip(greedy, greedy_again, strict=True))  # the same completions
    assert greedy_t1 != greedy_t2  # scored at another loss temperature
    _, sampled = run("hot", generation_temperature=2.0)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(greedy, sampled))  # sampled otherwise


def test_gradient_accumulation_gives_the_one_batch_losses(tmp_path):
    """Greedy completions (the same sequences however the prompts are batched) and the one normalisation rule: 2
    micro-batches of 4 with accumulation 2 train as one batch of 8."""
    args = dict(lmbda=1.0, generation_temperature=0.0, max_steps=2, optim="sgd", learning_rate=0.5,
                lr_scheduler_type="constant", max_grad_norm=0.0)
    one = trainer_for(tmp_path / "one", per_device_train_batch_size=8, **args)
    one.train()
    split = trainer_for(tmp_path / "split", per_device_train_batch_size=4, gradient_accumulation_steps=2, **args)
    split.train()
    assert split._completions.generate_calls["student"] == 2 * one._completions.generate_calls["student"] == 4
    assert losses(split) == pytest.approx(losses(one), rel=1e-5)
    for a, b in zip(one.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_lora_student_generates_with_its_adapters_and_trains_only_them(tmp_path):
    peft = pytest.importorskip("peft")
    student = peft.get_peft_model(llama(seed=1), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher_model=llama(layers=3, seed=2),
                                  args=training_args(tmp_path, max_steps=2, hard_label_weight=0.0, lmbda=1.0,
                                                     max_new_tokens=4, learning_rate=1e-2),
                                  train_dataset=prompt_data(), data_collator=PromptCompletionCollator(PAD),
                                  distillers=[{"name": "reverse_kl"}])
    trainer.train()
    assert trainer._completions.generate_calls["student"] == 2
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)


def test_generation_batch_size_splits_the_prompts_not_the_result(tmp_path):
    """Greedy completions of 4 prompts in calls of 1 are those of one call of 4; the call count says it split."""
    whole = trainer_for(tmp_path / "whole", lmbda=1.0, generation_temperature=0.0, max_steps=1)
    whole.train()
    pieces = trainer_for(tmp_path / "pieces", lmbda=1.0, generation_temperature=0.0, max_steps=1,
                         generation_batch_size=1)
    calls = []
    original = pieces.model.generate
    pieces.model.generate = lambda **kwargs: calls.append(len(kwargs["input_ids"])) or original(**kwargs)
    pieces.train()
    assert calls == [1, 1, 1, 1]
    assert losses(pieces) == pytest.approx(losses(whole), rel=1e-5)


def test_a_bf16_teacher_writes_the_completions_and_the_losses_stay_finite(tmp_path):
    trainer = trainer_for(tmp_path, seq_kd=True, teacher_dtype="bfloat16", max_steps=2)
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    trainer.train()
    assert trainer._completions.generate_calls == {"student": 0, "teacher": 2}
    assert all(0 < loss < float("inf") for loss in losses(trainer))
    metrics = trainer.evaluate(prompt_data(4, seed=1))
    assert 0 <= metrics["eval_teacher_agreement"] <= 1 and metrics["eval_kl_to_teacher"] >= 0


# Every per-row logit distiller of the registry reads generated completions (deit needs a distillation token, dgkd
# and ces_kd several teachers; they are not token-level LM losses).
ROW_LOGIT_DISTILLERS = sorted(name for name, cls in _REGISTRY.items() if cls.family == "logit"
                              and hasattr(cls, "divergence") and cls.__module__.startswith("hf_kd."))


@pytest.mark.parametrize("name", ROW_LOGIT_DISTILLERS)
def test_every_row_logit_distiller_trains_on_generated_completions(tmp_path, name):
    trainer = trainer_for(tmp_path, distillers=[{"name": name}], lmbda=1.0, max_steps=2)
    trainer.train()
    assert trainer._completions.generate_calls["student"] == 2
    assert all(entry[f"loss/{name}"] < float("inf") for entry in trainer.state.log_history if "loss" in entry)

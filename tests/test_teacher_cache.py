"""Training from an offline teacher cache (``teacher_cache=``): exactly the live-teacher run when the cache holds
full float32 logits (classifier, and causal LM on the fused path, several shuffled epochs), a resumed run continues
exactly, and caches of other data or heads, and distillers that need more than logits, are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_global_batch import BUILTIN, CASES, models_and_data

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer, build_distiller
from hf_kd.cache import cache_teacher_outputs

pytestmark = pytest.mark.usefixtures("one_thread")

KL = [{"name": "kl", "temperature": 2.0}]


def run(tmp_path, name, student, data, teacher=None, cache=None, distillers=KL, resume=None, **overrides):
    """Plain SGD: the runs compared differ by float rounding (the teacher ran on other batches), and Adam would turn
    the rounding of gradients that are zero in exact arithmetic (attention key biases) into full-size updates."""
    args = training_args(tmp_path / name, **{"num_train_epochs": 2, "per_device_train_batch_size": 4,
                                             "gradient_accumulation_steps": 2, "logging_steps": 1, "seed": 0,
                                             "learning_rate": 1e-1, "optim": "sgd", **overrides})
    trainer = DistillationTrainer(model=student, teacher_model=teacher, teacher_cache=cache, args=args,
                                  train_dataset=data, distillers=distillers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, [{k: v for k, v in log.items() if k.startswith("loss")} for log in trainer.state.log_history
                     if "loss" in log]


def assert_same(live, cached):
    (live_trainer, live_logs), (cached_trainer, cached_logs) = live, cached
    assert len(live_logs) == len(cached_logs) > 2
    for want, got in zip(live_logs, cached_logs):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key  # teacher batches differ: rounding
    for (name, want), got in zip(live_trainer.model.named_parameters(), cached_trainer.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_a_float32_cache_trains_a_classifier_exactly_as_the_live_teacher(tmp_path):
    data, teacher = text_classification_data(n=24), bert(layers=3, hidden=48, seed=2)
    cache = cache_teacher_outputs(teacher, data, tmp_path / "cache", values_dtype="float32")
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    cached = run(tmp_path, "cached", bert(seed=1), data, cache=cache)
    assert calls == []  # the teacher never ran
    assert_same(run(tmp_path, "live", bert(seed=1), data, teacher=teacher), cached)


def test_a_full_cache_trains_a_causal_lm_on_the_fused_path_exactly(tmp_path):
    data, teacher = lm_data(n=16), llama(layers=3, hidden=48, seed=2)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=None, values_dtype="float32")
    cached = run(tmp_path, "cached", llama(seed=1), data, cache=str(tmp_path / "cache"))
    live = run(tmp_path, "live", llama(seed=1), data, teacher=teacher)
    assert cached[0]._fused_lm and live[0]._fused_lm
    assert_same(live, cached)


def test_a_top_k_cache_approaches_the_live_teacher_as_k_grows(tmp_path):
    """The first step's kl from a top-k + tail cache (V = 97) nears the live value as k grows."""
    data, teacher = lm_data(n=16), llama(layers=3, hidden=48, seed=2)
    _, live = run(tmp_path, "live", llama(seed=1), data, teacher=teacher, max_steps=1)
    errors = []
    for k in (8, 32, 80):
        cache_teacher_outputs(teacher, data, tmp_path / f"cache{k}", top_k=k, values_dtype="float32")
        _, cached = run(tmp_path, f"cached{k}", llama(seed=1), data, cache=str(tmp_path / f"cache{k}"), max_steps=1)
        errors.append(abs(cached[0]["loss/kl"] - live[0]["loss/kl"]))
    assert errors[0] > errors[1] > errors[2] > 0, errors


def test_a_cached_run_resumes_exactly(tmp_path):
    data, teacher = text_classification_data(n=24), bert(layers=3, hidden=48, seed=2)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", values_dtype="float32")
    options = dict(cache=str(tmp_path / "cache"), save_strategy="steps", save_steps=2)
    straight = run(tmp_path, "straight", bert(seed=1), data, **options)
    run(tmp_path, "resumed", bert(seed=1), data, **options)
    resumed = run(tmp_path, "resumed", bert(seed=1), data, resume=str(tmp_path / "resumed" / "checkpoint-2"),
                  **options)
    assert_same((straight[0], straight[1][2:]), (resumed[0], resumed[1][-len(straight[1][2:]):]))


def test_caches_that_do_not_fit_the_run_are_refused(tmp_path):
    data, teacher = text_classification_data(n=24), bert(layers=3, hidden=48, seed=2)
    cache = str(tmp_path / "cache")
    cache_teacher_outputs(teacher, data, cache)
    args = training_args(tmp_path / "x", max_steps=1)
    other = text_classification_data(n=24, seed=9)
    with pytest.raises(ValueError, match=r"`teacher_cache` does not match train row 0: its inputs"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=other)
    with pytest.raises(ValueError, match=r"`teacher_cache` holds 24 rows and the train dataset has 12"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=data.select(range(12)))
    with pytest.raises(ValueError, match=r"`teacher_cache` holds logits of width 3 and the student has 5"):
        DistillationTrainer(model=bert(seed=1, num_labels=5), teacher_cache=cache, args=args, train_dataset=data)
    with pytest.raises(ValueError, match=r"'hidden_states' reads the teacher's hidden states, which `teacher_cache`"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=data,
                            distillers=[{"name": "kl"}, {"name": "hidden_states"}])
    with pytest.raises(ValueError, match="Give `teacher_model` or `teacher_cache`, not both"):
        DistillationTrainer(model=bert(seed=1), teacher_model=teacher, teacher_cache=cache, args=args,
                            train_dataset=data)
    with pytest.raises(ValueError, match=r"teacher_eval_metrics=True evaluates the teacher model.*teacher_cache"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, train_dataset=data,
                            args=training_args(tmp_path / "x", max_steps=1, teacher_eval_metrics=True))
    # the cache keeps the teacher's config: a student naming its classes in another order is refused
    named = bert(layers=3, hidden=48, seed=2, id2label={0: "sport", 1: "music", 2: "money"})
    cache_teacher_outputs(named, data, tmp_path / "named")
    with pytest.raises(ValueError, match=r"sport.*money|money.*sport"):
        DistillationTrainer(model=bert(seed=1, id2label={0: "money", 1: "music", 2: "sport"}), args=args,
                            teacher_cache=str(tmp_path / "named"), train_dataset=data)
    # the same texts tokenized to another max_length: every row's fingerprint differs
    shorter = data.map(lambda row: {k: row[k][:8] for k in ("input_ids", "attention_mask")})
    with pytest.raises(ValueError, match=r"does not match train row 0.*max_length"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=shorter)


def test_a_cache_built_with_another_tokenizer_is_refused(tmp_path):
    from transformers import BertTokenizer

    def tokenizer(words):
        return BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])})

    data, teacher = text_classification_data(n=8), bert(layers=3, hidden=48, seed=2)
    cache = str(tmp_path / "cache")
    cache_teacher_outputs(teacher, data, cache, tokenizer=tokenizer(["a", "b"]))
    args = training_args(tmp_path / "x", max_steps=1)
    with pytest.raises(ValueError, match=r"`teacher_cache` was built with another tokenizer than this trainer's"):
        DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=data,
                            processing_class=tokenizer(["a", "c"]))
    DistillationTrainer(model=bert(seed=1), teacher_cache=cache, args=args, train_dataset=data,
                        processing_class=tokenizer(["a", "b"]))  # the same vocabulary: accepted


def cacheable() -> list[str]:
    """Every built-in distiller a cache can serve: those reading the teacher's logits alone."""
    from hf_kd.cache_slot import refuse_uncached

    names = []
    for name in BUILTIN:
        distiller = build_distiller({"name": name, **CASES[name].options})
        try:
            refuse_uncached([(name, distiller)])
        except ValueError:
            continue
        if distiller.requires.teacher:
            names.append(name)
    return names


@pytest.mark.parametrize("name", cacheable())
def test_every_cacheable_distiller_trains_from_a_full_cache_as_from_the_teacher(name, tmp_path):
    data, teacher = lm_data(n=16), llama(layers=3, hidden=48, seed=2)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=None, values_dtype="float32")
    distillers = [{"name": name, **CASES[name].options}]
    cached = run(tmp_path, "cached", llama(seed=1), data, cache=str(tmp_path / "cache"), distillers=distillers)
    assert_same(run(tmp_path, "live", llama(seed=1), data, teacher=teacher, distillers=distillers), cached)


def hidden_cacheable() -> list[str]:
    """Every built-in distiller that reads the teacher's hidden states and a cache holding them can serve."""
    from hf_kd.cache_slot import refuse_uncached

    names = []
    for name in BUILTIN:
        distiller = build_distiller({"name": name, **CASES[name].options})
        try:
            refuse_uncached([(name, distiller)], {"hidden_states": [0]})
        except ValueError:
            continue
        if distiller.requires.teacher and distiller.requires.hidden_states:
            names.append(name)
    return names


def test_the_hidden_state_readers_a_cache_serves():
    assert {"hidden_states", "rkd", "sp", "pkt", "fsp", "topology", "crd"} <= set(hidden_cacheable())
    assert not {"attention", "tinybert", "minilm_relation", "feature"} & set(hidden_cacheable())


@pytest.mark.parametrize("name", hidden_cacheable())
def test_every_hidden_state_distiller_trains_from_a_full_cache_as_from_the_teacher(name, tmp_path):
    """Logits and every hidden layer cached per token in float32: the same losses and student as the live teacher
    (the stand-in teacher sizes projectors and layer maps as the real one does)."""
    student, teacher, _ = models_and_data(CASES[name])
    data = text_classification_data(n=16)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", values_dtype="float32", hidden_states=list(range(5)))
    distillers = [{"name": name, **CASES[name].options}]
    cached = run(tmp_path, "cached", copy.deepcopy(student), data, cache=str(tmp_path / "cache"),
                 distillers=distillers)
    assert_same(run(tmp_path, "live", student, data, teacher=teacher, distillers=distillers), cached)


def test_a_pooled_cache_serves_pooled_embeddings_and_names_what_it_lacks(tmp_path):
    """A mean-pooled last layer trains rkd (embedding=mean) and hidden_states (tokens=mean) as the live teacher;
    a distiller reading a token-level or another layer is stopped at its first batch, naming what the cache holds."""
    data, teacher = text_classification_data(n=16), bert(layers=3, hidden=48, seed=2)
    cache = str(tmp_path / "cache")
    cache_teacher_outputs(teacher, data, cache, values_dtype="float32", hidden_states=[-1], hidden_pooling="mean")
    pooled = [{"name": "rkd", "embedding": "mean"},
              {"name": "hidden_states", "tokens": "mean", "layer_map": {2: 3}, "projector": "linear"}]
    assert_same(run(tmp_path, "live", bert(seed=1), data, teacher=teacher, distillers=pooled),
                run(tmp_path, "cached", bert(seed=1), data, cache=cache, distillers=pooled))
    for distillers, reads in (([{"name": "rkd", "embedding": "cls"}], "-1 per token"),
                              ([{"name": "hidden_states", "tokens": "mean"}], "1")):
        with pytest.raises(ValueError, match=r"holds the teacher's layers \[3\] of its 4 hidden states, pooled "
                                             rf"\('mean'\), and a distiller reads hidden state {reads}"):
            run(tmp_path, "bad", bert(seed=1), data, cache=cache, distillers=distillers)


def test_a_cached_run_names_the_cause_of_a_non_finite_loss_and_refuses_left_padding(tmp_path):
    from hf_kd.capture import ModelView
    from hf_kd.nonfinite import nonfinite_cause

    data, teacher = lm_data(n=8), llama(layers=3, hidden=48, seed=2)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=None, values_dtype="float32")
    trainer = DistillationTrainer(model=llama(seed=1), teacher_cache=str(tmp_path / "cache"),
                                  args=training_args(tmp_path / "x", max_steps=1), train_dataset=data)
    [slot] = trainer._slots
    student = ModelView(model=trainer.model, task="causal_lm", logits=torch.full((1, 2, 3), float("nan")))
    cached = ModelView(model=None, task="causal_lm", logits=torch.zeros(1, 2, 3))  # the cache's view: no model
    assert nonfinite_cause(student, [slot], [cached]).startswith("The student's outputs are not finite")
    batch = next(iter(trainer.get_train_dataloader()))
    batch["attention_mask"] = batch["attention_mask"].flip(-1)  # padding on the left
    with pytest.raises(ValueError, match=r"batch is left-padded: train with tokenizer.padding_side='right'"):
        slot.forward(batch, {}, fused=False, training=True)

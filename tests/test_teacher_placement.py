"""Where the teacher lives: its dtype (a bf16 teacher beside an fp32 student), its device (``teacher_device``), one
forward per batch whatever the number of distillers reading it, and how sharding is chosen and refused
(``teacher_sharding``; the two-process FSDP2 runs are in tests/test_distributed.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from torch import nn

from conftest import EAGER, bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer
from hf_kd.sharding import block_modules, check_shardable, local_parameter_share, teacher_engine


def lm_run(tmp_path, name, **overrides):
    args = training_args(tmp_path / name, **{"max_steps": 3, "logging_steps": 1, "learning_rate": 1e-2,
                                             "per_device_train_batch_size": 4, "seed": 0, **overrides})
    trainer = DistillationTrainer(model=llama(seed=1), teacher_model=llama(layers=3, hidden=48, seed=2), args=args,
                                  train_dataset=lm_data(n=12), distillers=[{"name": "kl", "temperature": 2.0}])
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


def test_a_bf16_teacher_trains_an_fp32_student_to_bf16_tolerance(tmp_path):
    """teacher_dtype=bfloat16 on the fused causal-LM path: the teacher's weights are bf16, the student's fp32, and
    every logged loss equals the fp32-teacher run's to bf16 precision (3 significant bits lost at most)."""
    fp32, fp32_logs = lm_run(tmp_path, "fp32")
    bf16, bf16_logs = lm_run(tmp_path, "bf16", teacher_dtype="bfloat16")
    assert bf16._fused_lm and fp32._fused_lm
    assert bf16.teacher.lm_head.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    for want, got in zip(fp32_logs, bf16_logs, strict=True):
        for key in ("loss", "loss/kl", "loss/hard"):
            assert torch.isfinite(torch.tensor(got[key]))
            assert got[key] == pytest.approx(want[key], rel=2e-2, abs=1e-3), key
    assert bf16_logs[0]["loss/kl"] != fp32_logs[0]["loss/kl"]  # the teacher did run in bf16


def test_the_teacher_runs_once_per_batch_whatever_reads_it(tmp_path):
    teacher = bert(layers=3, hidden=48, seed=2, **EAGER)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    readers = [{"name": "kl"}, {"name": "dkd"}, {"name": "hidden_states", "projector": "linear"},
               {"name": "attention"}, {"name": "rkd"}]
    DistillationTrainer(model=bert(seed=1, **EAGER), teacher_model=teacher, args=args,
                        train_dataset=text_classification_data(), distillers=readers).train()
    assert len(calls) == 3 * 2  # steps x micro-batches


def test_teacher_device_runs_the_teacher_there_with_the_same_losses(tmp_path):
    """teacher_device='cpu' (the training device here): placed there, not through Accelerate, and the run is the
    default run. (A second device is not available on this machine: see docs for what moves.)"""
    default, default_logs = lm_run(tmp_path, "default")
    placed, placed_logs = lm_run(tmp_path, "cpu", teacher_device="cpu")
    assert placed.teacher.lm_head.weight.device == torch.device("cpu")
    assert placed._slots[0].device is None and placed._fused_lm  # the student's device: nothing moves
    for want, got in zip(default_logs, placed_logs, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


def accelerator(kind=DistributedType.NO, processes=1, zero_stage=None):
    return SimpleNamespace(distributed_type=kind, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))


def test_the_teacher_follows_a_sharding_student_engine():
    assert teacher_engine("none", accelerator()) == "none"
    assert teacher_engine("fsdp2", accelerator()) == "none"  # one process: nothing to shard
    assert teacher_engine("fsdp2", accelerator(DistributedType.MULTI_CPU, 2)) == "fsdp2"
    assert teacher_engine("none", accelerator(DistributedType.MULTI_CPU, 2)) == "none"
    assert teacher_engine("none", accelerator(DistributedType.FSDP, 2)) == "fsdp2"  # never silently replicated
    assert teacher_engine("none", accelerator(DistributedType.DEEPSPEED, 2, zero_stage=3)) == "deepspeed"
    assert teacher_engine("fsdp2", accelerator(DistributedType.DEEPSPEED, 2, zero_stage=2)) == "fsdp2"


def test_a_sharded_teacher_that_a_distiller_trains_is_refused():
    with pytest.raises(ValueError, match=r"teachers are sharded \(fsdp2: teacher_sharding.*teacher_sharding='none'"):
        check_shardable("fsdp2", [nn.Parameter(torch.zeros(2))])
    check_shardable("none", [nn.Parameter(torch.zeros(2))])
    check_shardable("fsdp2", [])


def test_the_trainer_refuses_an_online_distiller_on_a_sharded_teacher_when_built(tmp_path, monkeypatch):
    """The refusal comes from DistillationTrainer(...), before any model is sharded or trained (the engine is
    forced to fsdp2, which one process would not choose)."""
    monkeypatch.setattr("hf_kd.trainer.teacher_engine", lambda sharding, accelerator: "fsdp2")
    with pytest.raises(ValueError, match=r"teacher_sharding='none'"):
        DistillationTrainer(model=bert(seed=1), teacher_model=bert(seed=2), distillers=[{"name": "atsc"}],
                            args=training_args(tmp_path, max_steps=1), train_dataset=text_classification_data())


def test_a_deepspeed_teacher_engine_runs_under_no_grad_not_inference_mode():
    """ZeRO-3 gathers partitioned parameters into reused buffers, as FSDP2 does: is_sharded says so by the
    engine's module (deepspeed itself is not installed here)."""
    from hf_kd.sharding import is_sharded

    engine_class = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    assert is_sharded(engine_class()) and not is_sharded(nn.Linear(1, 1))


def test_the_blocks_sharded_one_unit_each():
    model = llama(layers=3)
    assert block_modules(model) == list(reversed(model.model.layers))  # _no_split_modules, innermost first
    bert_model = bert(layers=2)  # _no_split_modules: BertLayer and BertEmbeddings
    assert block_modules(bert_model) == [*reversed(bert_model.bert.encoder.layer), bert_model.bert.embeddings]
    plain = nn.Sequential(bert_model.bert.encoder.layer)  # none: its transformer layers
    plain.config = bert_model.config
    assert block_modules(plain) == list(bert_model.bert.encoder.layer)
    assert block_modules(model, ["LlamaMLP"]) == [m for m in reversed(list(model.modules())) if
                                                   type(m).__name__ == "LlamaMLP"]
    with pytest.raises(ValueError, match=r"`teacher_shard_modules`=\['Block'\] matches no module.*LlamaDecoderLayer"):
        block_modules(model, ["Block"])
    assert local_parameter_share(model) == 1.0

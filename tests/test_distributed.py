"""Two real processes (torchrun, gloo, CPU) give what one process gives on the same global batches: the logged losses,
the final student, the projector and the teacher-side weights, for logit KD on a classifier and on a padded causal
LM, hidden states through a projector, ATSC's online teacher, every relation distiller of the registry, two teachers
(learned aggregation, a projector per teacher), and a teacher sharded over the processes with FSDP2
(``teacher_sharding="fsdp2"``, the fused causal-LM path included), evaluation's teacher agreement (also over a set
whose last batch is padded across processes), on-policy GKD (each process generating for its own micro-batches), and
no teacher at all: a top-k offline cache
read by sample index under the distributed sampler. Default
TrainingArguments (``average_tokens_across_devices=True``); 2 processes x 4 and 2 processes x 2 x accumulation 2 vs
1 process x 8, or, for relation distillers, vs 1 process running the same micro-batches (distributed_run.REFERENCES).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

import distributed_run

HERE = os.path.dirname(__file__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    path = str(folder / "results.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(HERE, "distributed_run.py"), path]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("config", list(distributed_run.CONFIGS))
def test_two_processes_match_one_process(config, two_process_results, tmp_path, one_thread):
    references = {}
    for per_device, accumulation in distributed_run.LAYOUTS:
        layout = distributed_run.REFERENCES[config][(per_device, accumulation)]
        if layout not in references:
            references[layout] = distributed_run.run(config, *layout, output_dir=str(tmp_path / f"{layout}"))
        reference = references[layout]
        assert reference["processes"] == 1
        result = two_process_results[(config, per_device, accumulation)]
        where = f"{config}, 2 processes x {per_device} x accumulation {accumulation} vs 1 x {layout[0]} x {layout[1]}"
        assert result["processes"] == 2
        assert result["state_agrees"], f"{where}: the processes' distiller states differ"
        assert len(result["logs"]) == len(reference["logs"]) == distributed_run.STEPS, where  # one log per step
        for got, want in zip(result["logs"], reference["logs"]):
            assert got.keys() == want.keys(), where
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), f"{where}: {key}"
        for group in ("student", "distillers", "teacher"):
            assert result[group].keys() == reference[group].keys()
            for name, value in reference[group].items():
                torch.testing.assert_close(result[group][name], value, rtol=1e-5, atol=1e-6, msg=f"{where}: {name}")
        for group in ("eval", "padded_eval"):
            assert result[group].keys() == reference[group].keys()
            for key, value in reference[group].items():
                assert result[group][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{where}: {key}"
        assert result["checkpoint"].keys() == reference["checkpoint"].keys()
        for file, state in reference["checkpoint"].items():
            for name, value in state.items():
                torch.testing.assert_close(result["checkpoint"][file][name], value, rtol=1e-5, atol=1e-6)
    if config.startswith("sharded_teacher"):  # each process held half the teacher; one process holds it whole
        assert all(share <= 0.6 for share in result["teacher_shares"]), result["teacher_shares"]
        assert reference["teacher_shares"] == [1.0]
    if config == "sharded_teacher_classifier":
        assert {"eval_loss", "eval_loss/kl", "eval_teacher_loss"} <= reference["eval"].keys()
    if config in ("kl_classifier", "kl_padded_lm"):  # 11 rows: the padded last batch's repeats do not count
        assert {"eval_loss/kl", "eval_teacher_agreement", "eval_kl_to_teacher"} <= reference["eval"].keys()
        assert reference["padded_eval"].keys() == {"padded_teacher_agreement", "padded_kl_to_teacher"}
    if config == "sharded_teacher_fused_lm":
        assert result["fused"] and reference["fused"], "the fused causal-LM path must run with a sharded teacher"
    if config == "two_teachers_classifier":
        assert reference["distillers"]["0.aggregation.logits"].abs().sum() > 0, "the teacher weights must train"
    if config == "on_policy_lm":  # every step generated, each process for its own micro-batches
        assert reference["generate_calls"] == [distributed_run.STEPS]
        assert result["generate_calls"] == [distributed_run.STEPS * accumulation] * 2
    if config == "hidden_states_projector":
        assert reference["distillers"], "the projector must be trained"
    if config == "atsc_online_teacher":
        assert reference["teacher"] and "teacher_trained.pt" in reference["checkpoint"]

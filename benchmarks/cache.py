"""The offline teacher cache on the causal-LM recipe's data with the real SmolLM2-135M teacher (49,152 tokens):
bytes per cached token for several k, and the training step from a cache against a student-only step.

- Bytes per token: ``cache_teacher_outputs`` over ``--blocks`` blocks of the recipe's BBC News text at each
  ``--ks`` (float16 values, uint16 indices), the Arrow files' size over the tokens cached, next to the dense fp16
  distribution (49,152 x 2 bytes).
- Step time: a small Llama student (the recipe's ``student_*`` defaults) trained with ``kl`` from the k=64 cache,
  against the same student fine-tuned alone (plain ``Trainer``, cross-entropy) at the same batch; median optimizer
  step after ``--warmup``, the two interleaved in ``--rounds`` rounds, one thread.

Run::

    python benchmarks/cache.py                      # k = 8, 32, 64, 128; 5 rounds of 6 steps
    python benchmarks/cache.py --ks 64 --rounds 2   # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from step_times import StepTimes
from transformers import AutoModelForCausalLM, Trainer, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import causal_lm  # noqa: E402

from hf_kd import DistillationArguments, DistillationTrainer, cache_teacher_outputs  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--blocks", type=int, default=32, help="Blocks of 128 tokens cached.")
    parser.add_argument("--steps", type=int, default=6, help="Optimizer steps per timed run.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    return parser.parse_args(argv)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.arrow"))


def timed(trainer: Trainer, timer: StepTimes, warmup: int) -> float:
    trainer.train()
    return timer.median(warmup)


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)
    torch.set_num_threads(1)
    args, _ = causal_lm.RECIPE.parse_dict({"max_train_samples": cli.blocks})
    path = causal_lm.teacher_path(args)
    tokenizer = causal_lm.load_tokenizer(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train, _ = causal_lm.load_blocks(args, tokenizer)
    tokens = sum(len(ids) - 1 for ids in train["input_ids"])  # predicting positions per block
    vocab = teacher.config.vocab_size
    with tempfile.TemporaryDirectory() as folder:
        sizes = {}
        for k in cli.ks:
            cache_teacher_outputs(teacher, train, Path(folder) / f"k{k}", top_k=k, batch_size=8, tokenizer=tokenizer)
            sizes[k] = folder_bytes(Path(folder) / f"k{k}") / tokens
        print(f"Bytes per cached token ({tokens:,} tokens, vocabulary {vocab:,}; dense fp16: {2 * vocab:,} B):")
        print("| k | bytes / token | vs dense fp16 |\n|---|---|---|")
        for k, size in sizes.items():
            print(f"| {k} | {size:.0f} | {size / (2 * vocab):.4f} |")

        k = 64 if 64 in cli.ks else cli.ks[0]
        student = causal_lm.build_student(args, teacher, tokenizer, seed=0)
        ratios = []
        for round_ in range(cli.rounds):
            times = {}
            for kind in ("cache", "plain"):
                timer = StepTimes()
                run_args = DistillationArguments(
                    output_dir=str(Path(folder) / f"run-{kind}"), report_to=[], use_cpu=True, disable_tqdm=True,
                    save_strategy="no", max_steps=cli.steps, per_device_train_batch_size=cli.batch,
                    logging_steps=100, learning_rate=1e-4, seed=round_,
                    distillers=[{"name": "kl", "temperature": 2.0}])
                model = copy.deepcopy(student)
                trainer = (DistillationTrainer(model=model, teacher_cache=str(Path(folder) / f"k{k}"), args=run_args,
                                               train_dataset=train, data_collator=default_data_collator,
                                               callbacks=[timer])
                           if kind == "cache" else
                           Trainer(model=model, args=run_args, train_dataset=train,
                                   data_collator=default_data_collator, callbacks=[timer]))
                times[kind] = timed(trainer, timer, cli.warmup)
            ratios.append(times["cache"] / times["plain"])
            print(f"round {round_}: cache {times['cache'] * 1000:.0f} ms, student alone {times['plain'] * 1000:.0f} ms")
        print(f"Step from the k={k} cache / student-only step (median of {cli.rounds} rounds): "
              f"{statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()

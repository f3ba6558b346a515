"""On-policy distillation (GKD, lmbda=1) with hf_kd's ``DistillationTrainer`` against TRL's ``GKDTrainer``.

Both trainers get the same tiny Llama pair (student ``--student-layers`` x ``--student-hidden``, teacher
``--teacher-layers`` x ``--teacher-hidden``, vocabulary ``--vocab``, random weights from fixed seeds), the same
prompts (random token ids, lengths drawn from ``[--min-prompt, --max-prompt]``, fixed seed) and the same settings:
every optimizer step generates ``--max-new-tokens`` tokens per prompt with the student (sampling at
``--temperature``, top_k 0, top_p 1, stopping at EOS), then trains on the generalized JSD with beta 0.5 at loss
temperature 1; batch ``--batch``, AdamW at ``--lr``, fp32, no gradient checkpointing (TRL's ``SFTConfig`` defaults
to ``bf16=True`` and ``gradient_checkpointing=True``; both are switched off here to match), ``--threads`` intra-op
threads. hf_kd: distiller ``{"name": "jsd", "beta": 0.5}``, ``hard_label_weight=0``, the default fused chunked LM
loss. TRL: ``GKDConfig(lmbda=1, beta=0.5)`` with its own ``DataCollatorForChatML`` fed token-id rows
(``input_ids`` + ``completion_mask``: the prompt is the part before the completion). Each row's dataset completion
(random ids, ``--max-new-tokens`` long, then EOS) is never trained on at lmbda=1; it is there because TRL's Trainer
counts the batch's tokens (``num_items_in_batch``) from the dataset labels before it generates.

Every measurement is a fresh child process running one warm-up step and then ``--steps`` steps; per round the
children alternate (hf_kd timing, TRL timing, hf_kd memory, TRL memory) so machine noise hits both alike.

* Step time: between consecutive ``on_step_end`` callbacks (so generation, which hf_kd does while fetching the
  step's batches and TRL inside ``training_step``, is included), median over the timed steps; default allocator.
* Generation: hf_kd's logged ``on_policy/generation_seconds_per_step`` / ``on_policy/generated_length``; TRL's
  ``generate_on_policy_outputs`` timed by a wrapper, its length the completion's label tokens (EOS included).
* Peak memory: in a child started with ``MALLOC_MMAP_THRESHOLD_=131072`` (freed large blocks go back to the OS, so
  the resident set follows live tensors); at the end of the warm-up step (model, optimizer state, data built) the
  child reads ``VmRSS``, resets the kernel's peak mark (``echo 5 > /proc/self/clear_refs``), and reports
  ``VmHWM - VmRSS_then`` after the timed steps: the extra memory the training steps needed at their peak.

Commands (RESULTS.md, issue 18; ~10 and ~6 min on 2 shared CPU cores)::

    python benchmarks/on_policy.py --rounds 3 --steps 4                            # vocab 32000, batch 8
    python benchmarks/on_policy.py --rounds 5 --steps 4 --vocab 16384 --batch 4    # steps of ~1 s
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TRAINERS = ("hf_kd", "trl")
PAD, BOS, EOS = 0, 1, 2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps per child, after one warm-up step")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--teacher-layers", type=int, default=4)
    p.add_argument("--teacher-hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of both trainers")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the per-round results to this file")
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def llama(args: argparse.Namespace, layers: int, hidden: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=4 * hidden,
                         max_position_embeddings=args.max_prompt + args.max_new_tokens + 8,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return LlamaForCausalLM(config)


def tokenizer(vocab: int):
    """A WordLevel tokenizer over the ids ``t0 .. t{vocab-1}`` (the data is token ids; trainers read its specials)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=f"t{PAD}", bos_token=f"t{BOS}",
                                   eos_token=f"t{EOS}", unk_token="t3")


def prompt_data(args: argparse.Namespace, tok):
    """One prompt per row of every step's batch: ``input_ids`` (prompt, dataset completion, EOS), ``prompt_length``."""
    import torch
    from datasets import Dataset

    from hf_kd import tokenize_prompts

    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for _ in range(args.batch * (args.steps + 1)):
        length = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=g))
        rows.append({"prompt": torch.randint(3, args.vocab, (length,), generator=g).tolist(),
                     "completion": torch.randint(3, args.vocab, (args.max_new_tokens,), generator=g).tolist()})
    return tokenize_prompts(Dataset.from_list(rows), tok)


def shared_args(args: argparse.Namespace, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
                learning_rate=args.lr, seed=args.seed, use_cpu=True, report_to=[], logging_steps=1,
                save_strategy="no", disable_tqdm=True)


def hf_kd_trainer(args, output_dir, student, teacher, data, tok, callback):
    from hf_kd import DistillationArguments, DistillationTrainer, PromptCompletionCollator

    kd_args = DistillationArguments(**shared_args(args, output_dir), hard_label_weight=0.0, lmbda=1.0,
                                    max_new_tokens=args.max_new_tokens, generation_temperature=args.temperature,
                                    top_p=1.0, top_k=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=kd_args, train_dataset=data,
                               data_collator=PromptCompletionCollator(PAD), processing_class=tok,
                               distillers=[{"name": "jsd", "beta": 0.5}], callbacks=[callback])


def trl_trainer(args, output_dir, student, teacher, data, tok, callback):
    """TRL's GKDTrainer on the same rows, as ``input_ids`` + ``completion_mask`` for its ``DataCollatorForChatML``;
    its ``generate_on_policy_outputs`` is wrapped to time the generation and count the generated tokens."""
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    data = data.map(lambda row: {"prompt": row["input_ids"][: row["prompt_length"]],
                                 "completion_mask": [0] * row["prompt_length"]
                                 + [1] * (len(row["input_ids"]) - row["prompt_length"])})
    gkd_args = GKDConfig(**shared_args(args, output_dir), lmbda=1.0, beta=0.5, temperature=args.temperature,
                         max_new_tokens=args.max_new_tokens, bf16=False, gradient_checkpointing=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=gkd_args, train_dataset=data,
                         processing_class=tok, callbacks=[callback])
    generate = trainer.generate_on_policy_outputs

    def timed_generate(model, inputs, generation_config):
        start = time.perf_counter()
        ids, mask, labels = generate(model, inputs, generation_config)
        callback.generations.append((time.perf_counter() - start, float((labels != -100).sum(1).float().mean())))
        return ids, mask, labels

    trainer.generate_on_policy_outputs = timed_generate
    return trainer


def clock_callback(memory: bool):
    """Step-end timestamps and the process's system CPU seconds at the end of the warm-up step; with ``memory``, the
    resident set then and a reset peak mark."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.generations, self.baseline_kb, self.system_s = [], [], None, None

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if state.global_step == 1:
                self.system_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime
                if memory:
                    self.baseline_kb = status_kb("VmRSS")
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # VmHWM := VmRSS

    return Clock()


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(args: argparse.Namespace) -> dict:
    """One fresh trainer of ``args.child``: one warm-up step, then ``args.steps`` measured steps."""
    import torch

    torch.set_num_threads(args.threads)
    tok = tokenizer(args.vocab)
    student = llama(args, args.student_layers, args.student_hidden, seed=args.seed + 1)
    teacher = llama(args, args.teacher_layers, args.teacher_hidden, seed=args.seed + 2)
    callback = clock_callback(args.memory)
    build = hf_kd_trainer if args.child == "hf_kd" else trl_trainer
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build(args, output_dir, student, teacher, prompt_data(args, tok), tok, callback)
        trainer.train()
    if args.memory:
        return {"peak_mb": (status_kb("VmHWM") - callback.baseline_kb) / 1024}
    steps = [b - a for a, b in zip(callback.ends, callback.ends[1:])]
    if args.child == "hf_kd":
        logs = [e for e in trainer.state.log_history if "on_policy/generated_length" in e and e["step"] > 1]
        generation = [(e["on_policy/generation_seconds_per_step"], e["on_policy/generated_length"]) for e in logs]
    else:
        generation = callback.generations[1:]
    system_s = (resource.getrusage(resource.RUSAGE_SELF).ru_stime - callback.system_s) / args.steps
    return {"step_s": statistics.median(steps), "system_s": system_s,
            "generation_s": statistics.median(s for s, _ in generation),
            "generated_length": statistics.mean(n for _, n in generation)}


def run_child(name: str, memory: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root(), os.environ.get("PYTHONPATH")])))
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    command = [sys.executable, __file__, *sys.argv[1:], "--child", name] + (["--memory"] if memory else [])
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{name} child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratio(rounds: list[dict], key: str) -> float:
    return statistics.median(r["hf_kd"][key] / r["trl"][key] for r in rounds)


def share(rounds: list[dict], name: str) -> float:
    return statistics.median(r[name]["generation_s"] / r[name]["step_s"] for r in rounds)


def median(rounds: list[dict], name: str, key: str) -> float:
    return statistics.median(r[name][key] for r in rounds)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    print(f"student {args.student_layers}x{args.student_hidden}, teacher {args.teacher_layers}x{args.teacher_hidden}, "
          f"vocab {args.vocab}, batch {args.batch}, prompts {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.max_new_tokens} new tokens at temperature {args.temperature}, {args.steps} steps after 1 warm-up, "
          f"{args.threads} thread(s)")
    rounds = []
    for r in range(args.rounds):
        result = {name: run_child(name, memory=False) for name in TRAINERS}
        for name in TRAINERS:
            result[name].update(run_child(name, memory=True))
        rounds.append(result)
        ours, trl = result["hf_kd"], result["trl"]
        print(f"round {r + 1}: step ms {ours['step_s'] * 1e3:.0f} / {trl['step_s'] * 1e3:.0f} "
              f"= {ours['step_s'] / trl['step_s']:.2f}x (system CPU {ours['system_s'] * 1e3:.0f} / "
              f"{trl['system_s'] * 1e3:.0f}), peak MB {ours['peak_mb']:.0f} / {trl['peak_mb']:.0f} "
              f"= {ours['peak_mb'] / trl['peak_mb']:.2f}x, generation ms {ours['generation_s'] * 1e3:.0f} / "
              f"{trl['generation_s'] * 1e3:.0f} (hf_kd's share {ours['generation_s'] / ours['step_s']:.0%}), "
              f"generated length {ours['generated_length']:.1f} / {trl['generated_length']:.1f}", flush=True)

    print(f"median over {args.rounds} rounds (hf_kd / TRL): step time {ratio(rounds, 'step_s'):.2f}x (target <= 0.9), "
          f"peak memory {ratio(rounds, 'peak_mb'):.2f}x (target <= 0.5), generation time "
          f"{ratio(rounds, 'generation_s'):.2f}x; generation share of the step {share(rounds, 'hf_kd'):.0%} / "
          f"{share(rounds, 'trl'):.0%}; generated length {median(rounds, 'hf_kd', 'generated_length'):.1f} / "
          f"{median(rounds, 'trl', 'generated_length'):.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    main()

"""Step-time overhead of ``hf_kd.DistillationTrainer`` against a plain PyTorch loop doing the same math.

Both sides train identical copies of the same student (same initial weights) against the same frozen teacher on
the same pre-built batches, with the Trainer's defaults:

- loss = ``hard_label_weight * CE(student, labels) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``
  (mean over samples for the classifier, over tokens whose shifted label is not -100 for the causal LM);
- teacher forward under ``torch.inference_mode()``; student forward + backward; all fp32;
- ``clip_grad_norm_(..., 1.0)``; ``torch.optim.AdamW`` built with exactly the kwargs the Trainer uses for its
  ``args.optim`` (transformers 5 on torch >= 2.8 defaults to ``adamw_torch_fused``, i.e. ``fused=True``;
  lr 5e-5, betas (0.9, 0.999), eps 1e-8, weight_decay 0.0); linear LR decay to 0 over the run, no warmup.

Data: ``batches`` is a list of dicts of tensors built once. The Trainer gets a map-style dataset whose item ``i``
is ``batches[i]`` itself, ``per_device_train_batch_size=1``, ``train_sampling_strategy="sequential"`` and a
collator that returns ``features[0]`` unchanged, so its data work is handing over an already-built batch, just as
the loop's ``batches[i]``. (The fetch is outside the timed region on both sides anyway.)

Timing: the Trainer step is the region between ``on_step_begin`` and ``on_step_end`` (forward, backward, clipping,
optimizer and scheduler step, ``zero_grad`` and Trainer's per-step bookkeeping). A timing callback is put *first*
in the callback list for ``on_step_begin`` and *last* for ``on_step_end``, so the hf_kd callbacks
(``ScheduleCallback``, ``_StepEvents``) are inside the timed region. The loop is timed around the same work.

Interleaving: inside the Trainer's last ``on_step_end`` of every block of ``--block`` steps the plain loop runs
``--block`` steps, so the two alternate in blocks for the whole run (``--rounds`` blocks each). The first
``--warmup`` steps of each side are dropped. For the LM, the Trainer alternates blocks with the fused LM loss on
and off (``fused_lm_loss=True`` is the default; the switch flips the trainer's ``_fused_lm`` flag between blocks,
the same flag ``DistillationArguments.fused_lm_loss`` sets), so fused / unfused / plain are all interleaved.

Also reported: the full iteration time (begin of step k to begin of step k+1 inside a block), which adds the
Trainer's dataloader, logging and callbacks around the step.

Run ``python benchmarks/overhead.py --help`` for the size and step flags; ``--profile`` prints a cProfile of
Trainer steps (hf_kd and transformers frames).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)
from transformers.utils import logging as hf_logging

import hf_kd
from hf_kd import DistillationArguments, DistillationTrainer


# ----------------------------------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------------------------------
def build_classifier(a, teacher: bool, seed: int):
    torch.manual_seed(seed)
    hidden = a.cls_teacher_hidden if teacher else a.cls_hidden
    layers = a.cls_teacher_layers if teacher else a.cls_layers
    config = BertConfig(
        vocab_size=a.cls_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 1),
        intermediate_size=4 * hidden, max_position_embeddings=max(512, a.cls_seq), num_labels=a.cls_labels,
    )
    return BertForSequenceClassification(config)


def build_lm(a, teacher: bool, seed: int):
    torch.manual_seed(seed)
    hidden = a.lm_teacher_hidden if teacher else a.lm_hidden
    layers = a.lm_teacher_layers if teacher else a.lm_layers
    heads = max(hidden // 64, 1)
    config = LlamaConfig(
        vocab_size=a.lm_vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1), intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        max_position_embeddings=max(2048, a.lm_seq), bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def classifier_batches(a, n: int):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, a.cls_vocab, (a.cls_batch, a.cls_seq), generator=g)
        mask = torch.ones_like(ids)
        mask[::4, a.cls_seq * 3 // 4 :] = 0  # some padding
        labels = torch.randint(0, a.cls_labels, (a.cls_batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def lm_batches(a, n: int):
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(3, a.lm_vocab, (a.lm_batch, a.lm_seq), generator=g)
        mask = torch.ones_like(ids)
        mask[::2, a.lm_seq * 7 // 8 :] = 0  # right padding in half the rows
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


class PrebuiltBatches(Dataset):
    """Item ``i`` is the ready batch ``batches[i]``; used with batch size 1 and :func:`unwrap_collator`."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def unwrap_collator(features):
    return features[0]


# ----------------------------------------------------------------------------------------------------------------
# the plain PyTorch loop
# ----------------------------------------------------------------------------------------------------------------
class PlainLoop:
    """Same math as the trainer, written the straightforward way (full logits, fp32 log_softmax)."""

    def __init__(self, student, teacher, batches, total_steps, task, a, optimizer_kwargs):
        self.student, self.teacher, self.batches, self.task, self.a = student, teacher, batches, task, a
        self.student.train()
        self.teacher.eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.student.parameters(), **optimizer_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, (total_steps - s) / max(1, total_steps))
        )
        self.i = 0
        self.step_times: list[float] = []
        self.iter_times: list[float] = []

    def loss(self, batch):
        T, a = self.a.temperature, self.a
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.inference_mode():
            t_logits = self.teacher(**model_inputs).logits
        s_logits = self.student(**model_inputs).logits
        labels = batch["labels"]
        if self.task == "causal_lm":
            s = s_logits[:, :-1].reshape(-1, s_logits.shape[-1])
            t = t_logits[:, :-1].reshape(-1, t_logits.shape[-1])
            y = labels[:, 1:].reshape(-1)
            valid = y != -100
            n = valid.sum()
            hard = F.cross_entropy(s.float(), y, ignore_index=-100, reduction="sum") / n
            log_s = F.log_softmax(s.float() / T, dim=-1)
            log_t = F.log_softmax(t.float() / T, dim=-1)
            kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
            kd = (kl * valid).sum() / n * (T * T)
        else:
            hard = F.cross_entropy(s_logits.float(), labels)
            log_s = F.log_softmax(s_logits.float() / T, dim=-1)
            log_t = F.log_softmax(t_logits.float() / T, dim=-1)
            kd = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean() * (T * T)
        return a.hard_weight * hard + a.kd_weight * kd

    def run(self, steps: int):
        previous = None
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            start = time.perf_counter()
            if previous is not None:
                self.iter_times.append(start - previous)
            previous = start
            loss = self.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_times.append(time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# timing callbacks and the interleaved run
# ----------------------------------------------------------------------------------------------------------------
class StepBegin(TrainerCallback):
    def __init__(self, clock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.begin()


class StepEnd(TrainerCallback):
    def __init__(self, clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.end()


class Clock:
    """Per-step times of the trainer by variant; runs the loop block (and switches variant) between blocks."""

    def __init__(self, trainer_variants, block, loop, switch, profile_steps=0):
        self.variants = trainer_variants  # e.g. ["fused", "unfused"] or ["trainer"]
        self.block, self.loop, self.switch = block, loop, switch
        self.step_times = {v: [] for v in self.variants}
        self.iter_times = {v: [] for v in self.variants}
        self.count = 0
        self.block_index = 0
        self.t0 = None
        self.previous_begin = None
        self.profiler = cProfile.Profile() if profile_steps else None
        self.profile_steps = profile_steps
        self.profiled = 0

    @property
    def variant(self):
        return self.variants[self.block_index % len(self.variants)]

    def begin(self):
        now = time.perf_counter()
        if self.previous_begin is not None:
            self.iter_times[self.variant].append(now - self.previous_begin)
        self.t0 = time.perf_counter()
        if self.profiler is not None and self.profiled < self.profile_steps and self.count >= 2:
            self.profiler.enable()

    def end(self):
        if self.profiler is not None and self.profiler_enabled():
            self.profiler.disable()
            self.profiled += 1
        self.step_times[self.variant].append(time.perf_counter() - self.t0)
        self.count += 1
        self.previous_begin = None
        if self.count % self.block == 0:
            # the loop block: one block of plain steps per trainer block
            self.loop.run(self.block)
            self.block_index += 1
            self.switch(self.variant)
        else:
            self.previous_begin = self.t0

    def profiler_enabled(self):
        return self.profiled < self.profile_steps and self.count >= 2


def median_ms(values, skip):
    values = values[skip:]
    return statistics.median(values) * 1e3 if values else float("nan")


def trainer_optimizer_kwargs(args) -> dict:
    """The kwargs Trainer builds its AdamW with (adamw_torch / adamw_torch_fused)."""
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if cls is not torch.optim.AdamW:
        raise SystemExit(f"This benchmark mirrors torch AdamW; args.optim={args.optim} gives {cls}.")
    return dict(kwargs)


def run_case(name, a, student, teacher, batches, task, variants, output_dir):
    total = a.warmup + a.rounds * a.block * len(variants)
    block = a.block
    student_trainer = student
    student_loop = copy.deepcopy(student)
    teacher_loop = copy.deepcopy(teacher)
    args = DistillationArguments(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        max_steps=total,
        hard_label_weight=a.hard_weight,
        distillers=[{"name": "kl", "temperature": a.temperature, "weight": a.kd_weight}],
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="no",
        use_cpu=True,
        max_grad_norm=1.0,
        seed=0,
        data_seed=0,
    )
    optimizer_kwargs = trainer_optimizer_kwargs(args)
    # the loop covers as many steps as one trainer variant does: its LR schedule spans that many steps
    loop = PlainLoop(student_loop, teacher_loop, batches, a.warmup + a.rounds * block, task, a, optimizer_kwargs)
    trainer = DistillationTrainer(
        model=student_trainer, teacher_model=teacher, args=args,
        train_dataset=PrebuiltBatches(batches[: total]), data_collator=unwrap_collator,
    )

    def switch(variant):
        if variant in ("fused", "unfused"):
            if not hasattr(trainer, "_fused_lm"):
                raise SystemExit("DistillationTrainer has no `_fused_lm` flag any more; update benchmarks/overhead.py")
            trainer._fused_lm = variant == "fused"

    if "fused" in variants and not trainer._fused_lm:
        raise SystemExit("The trainer did not pick the fused LM path; check the model (linear head, no softcapping).")
    switch(variants[0])
    clock = Clock(variants, block, loop, switch, a.profile)
    trainer.callback_handler.callbacks.insert(0, StepBegin(clock))
    trainer.add_callback(StepEnd(clock))

    # warm-up steps of the loop before the first block (the trainer's warm-up steps are dropped from its list)
    loop.run(a.warmup)
    loop.step_times.clear()
    loop.iter_times.clear()
    trainer.train()

    skip = a.warmup  # the first steps of the first variant are warm-up (allocator, AdamW state, caches)
    result = {"name": name, "loop": median_ms(loop.step_times, 0), "loop_iter": median_ms(loop.iter_times, 0)}
    for i, v in enumerate(variants):
        # variant 0 has the warm-up steps in front; later variants' first block warms up the other path
        result[v] = median_ms(clock.step_times[v], skip if i == 0 else 1)
        result[v + "_iter"] = median_ms(clock.iter_times[v], skip if i == 0 else 1)
    result["n_loop"] = len(loop.step_times)
    result["n_trainer"] = {v: len(clock.step_times[v]) for v in variants}
    if clock.profiler is not None:
        stream = io.StringIO()
        stats = pstats.Stats(clock.profiler, stream=stream).sort_stats("cumulative")
        stats.print_stats(a.profile_lines)
        result["profile"] = stream.getvalue()
        stream = io.StringIO()
        pstats.Stats(clock.profiler, stream=stream).sort_stats("tottime").print_stats(a.profile_lines)
        result["profile_tottime"] = stream.getvalue()
    return result


def report(r, variants):
    print(f"\n== {r['name']} ==")
    print(f"  plain loop          : {r['loop']:8.2f} ms/step   (n={r['n_loop']}; full iteration {r['loop_iter']:.2f} ms)")
    for v in variants:
        label = "DistillationTrainer" if v == "trainer" else f"Trainer {v}"
        ratio = r[v] / r["loop"]
        print(
            f"  {label:<20}: {r[v]:8.2f} ms/step   ratio {ratio:.3f}   (n={r['n_trainer'][v]}; full iteration "
            f"{r[v + '_iter']:.2f} ms, ratio {r[v + '_iter'] / r['loop_iter']:.3f})"
        )
    if "fused" in variants and "unfused" in variants:
        print(f"  fused / unfused     : {r['fused'] / r['unfused']:.3f}")
    if "profile" in r:
        print("\n-- cProfile of trainer steps (cumulative) --\n" + r["profile"])
        print("\n-- cProfile of trainer steps (tottime) --\n" + r["profile_tottime"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cls,lm", help="comma list of: cls, lm")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    p.add_argument("--rounds", type=int, default=4, help="blocks per side (per trainer variant)")
    p.add_argument("--block", type=int, default=5, help="steps per block")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each side")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hard-weight", type=float, default=0.5, help="hard_label_weight")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the kl distiller")
    p.add_argument("--no-unfused", action="store_true", help="LM: only the default fused path")
    # classifier
    p.add_argument("--cls-batch", type=int, default=16)
    p.add_argument("--cls-seq", type=int, default=64)
    p.add_argument("--cls-vocab", type=int, default=30522)
    p.add_argument("--cls-labels", type=int, default=4)
    p.add_argument("--cls-hidden", type=int, default=256)
    p.add_argument("--cls-layers", type=int, default=4)
    p.add_argument("--cls-teacher-hidden", type=int, default=384)
    p.add_argument("--cls-teacher-layers", type=int, default=6)
    # causal LM
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--lm-seq", type=int, default=128)
    p.add_argument("--lm-vocab", type=int, default=16384)
    p.add_argument("--lm-hidden", type=int, default=256)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-teacher-hidden", type=int, default=384)
    p.add_argument("--lm-teacher-layers", type=int, default=6)
    p.add_argument("--profile", type=int, default=0, help="cProfile this many trainer steps (after 2) and print")
    p.add_argument("--profile-lines", type=int, default=40)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    print(
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, hf_kd {hf_kd.__version__}, "
        f"threads {torch.get_num_threads()}, cpu count {os.cpu_count()}"
    )
    print(f"rounds={a.rounds} block={a.block} warmup={a.warmup} T={a.temperature} hard={a.hard_weight} kd={a.kd_weight}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in [m.strip() for m in a.models.split(",") if m.strip()]:
            if which == "cls":
                variants = ["trainer"]
                student, teacher = build_classifier(a, False, 0), build_classifier(a, True, 1)
                n = a.warmup + a.rounds * a.block * len(variants) + 1
                batches = classifier_batches(a, n)
                name = (f"classifier: BERT student {a.cls_layers}x{a.cls_hidden} / teacher "
                        f"{a.cls_teacher_layers}x{a.cls_teacher_hidden}, batch {a.cls_batch} x seq {a.cls_seq}, "
                        f"{a.cls_labels} labels")
                task = "classification"
            elif which == "lm":
                variants = ["fused"] if a.no_unfused else ["fused", "unfused"]
                student, teacher = build_lm(a, False, 0), build_lm(a, True, 1)
                n = a.warmup + a.rounds * a.block * len(variants) + 1
                batches = lm_batches(a, n)
                name = (f"causal LM: Llama student {a.lm_layers}x{a.lm_hidden} / teacher "
                        f"{a.lm_teacher_layers}x{a.lm_teacher_hidden}, vocab {a.lm_vocab}, batch {a.lm_batch} x seq "
                        f"{a.lm_seq}")
                task = "causal_lm"
            else:
                raise SystemExit(f"unknown model {which!r}")
            start = time.perf_counter()
            r = run_case(name, a, student, teacher, batches, task, variants, os.path.join(tmp, which))
            r["wall"] = time.perf_counter() - start
            report(r, variants)
            print(f"  (wall {r['wall']:.0f} s)")
            results.append((r, variants))
    print("\nSummary (median step time ratio, target <= 1.05):")
    for r, variants in results:
        for v in variants:
            print(f"  {r['name'].split(':')[0]:<11} {v:<8} {r[v] / r['loop']:.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

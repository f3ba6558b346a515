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

Second phase (on by default, ``--no-hand-written`` skips it): a bare ``transformers.Trainer`` whose
``compute_loss`` is the loop's loss, timed the same way and interleaved with the same loop. Its ratio is what
Trainer + Accelerate cost by themselves; the difference to the DistillationTrainer ratio is hf_kd's share.

Every case first checks that the trainer's loss equals the loop's on the first batch (same weights).

Threads: ``torch.set_num_threads(--threads)`` (default 1) for everything. On a 2-core machine shared with other
jobs, 2 intra-op threads get descheduled and step times vary by several x; 1 thread keeps the medians stable.

Run ``python benchmarks/overhead.py --help`` for the size and step flags; ``--profile N`` cProfiles N trainer
steps per variant after the warm-up (those steps are left out of the timings) and prints the top functions.
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
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_callback import PrinterCallback
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
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic, so the loss check below is exact
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
def kd_loss(s_logits, t_logits, labels, task, a):
    """``hard_weight * CE + kd_weight * T^2 * KL(p_t^T || p_s^T)``, written the straightforward way."""
    T = a.temperature
    if task == "causal_lm":
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


class HandWrittenKDTrainer(Trainer):
    """A bare ``transformers.Trainer`` whose ``compute_loss`` is :func:`kd_loss` (the usual hand-written KD trainer).

    Only used to split the overhead into what ``Trainer``/Accelerate cost and what hf_kd adds on top.
    """

    def __init__(self, *args, teacher_model=None, task=None, bench_args=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.task, self.bench_args = teacher_model.eval().requires_grad_(False), task, bench_args

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        with torch.inference_mode():
            t_logits = self.teacher(**model_inputs).logits
        outputs = model(**model_inputs)
        loss = kd_loss(outputs.logits, t_logits, inputs["labels"], self.task, self.bench_args)
        return (loss, outputs) if return_outputs else loss


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
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.inference_mode():
            t_logits = self.teacher(**model_inputs).logits
        s_logits = self.student(**model_inputs).logits
        return kd_loss(s_logits, t_logits, batch["labels"], self.task, self.a)

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

    def __init__(self, trainer_variants, block, loop, switch, warmup, profile_steps=0):
        self.variants = trainer_variants  # e.g. ["fused", "unfused"] or ["trainer"]
        self.block, self.loop, self.switch, self.warmup = block, loop, switch, warmup
        self.step_times = {v: [] for v in self.variants}
        self.iter_times = {v: [] for v in self.variants}
        self.count = 0
        self.block_index = 0
        self.t0 = None
        self.previous_begin = None
        # cProfile per variant, on `profile_steps` steps after the warm-up (those steps are left out of the timings)
        self.profilers = {v: cProfile.Profile() for v in self.variants} if profile_steps else {}
        self.profile_steps = profile_steps
        self.profiled = {v: 0 for v in self.variants}
        self.profiling = False

    @property
    def variant(self):
        return self.variants[self.block_index % len(self.variants)]

    def begin(self):
        now = time.perf_counter()
        if self.previous_begin is not None:
            self.iter_times[self.variant].append(now - self.previous_begin)
        v = self.variant
        if self.count <= self.warmup:
            self.iter_times[v].clear()
        self.profiling = bool(self.profilers) and self.count >= self.warmup and self.profiled[v] < self.profile_steps
        self.t0 = time.perf_counter()
        if self.profiling:
            self.profilers[v].enable()

    def end(self):
        elapsed = time.perf_counter() - self.t0
        v = self.variant
        if self.profiling:
            self.profilers[v].disable()
            self.profiled[v] += 1
        elif self.count >= self.warmup:
            self.step_times[v].append(elapsed)
        self.count += 1
        self.previous_begin = None
        if self.count % self.block == 0:
            # the loop block: one block of plain steps per trainer block
            self.loop.run(self.block)
            self.block_index += 1
            self.switch(self.variant)
        elif not self.profiling:
            self.previous_begin = self.t0


def check_same_loss(trainer, loop, batch, variants, switch):
    """Both sides compute the same loss on the same batch and weights (printed; no backward, no state change)."""
    reference = loop.loss(batch).item()
    model = trainer.model
    model.train()
    for v in variants:
        switch(v)
        num_items = trainer._get_num_items_in_batch([batch], trainer.args.device)
        value = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items).item()
        print(f"  loss check [{v}]: trainer {value:.6f}  loop {reference:.6f}  |diff| {abs(value - reference):.2e}")
    trainer.ledger.__init__()  # forget the check in the logged components


def median_ms(values, skip):
    values = values[skip:]
    return statistics.median(values) * 1e3 if values else float("nan")


def trainer_optimizer_kwargs(args) -> dict:
    """The kwargs Trainer builds its AdamW with (adamw_torch / adamw_torch_fused)."""
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if cls is not torch.optim.AdamW:
        raise SystemExit(f"This benchmark mirrors torch AdamW; args.optim={args.optim} gives {cls}.")
    return dict(kwargs)


def common_args(output_dir, total):
    """Trainer defaults, minus output: no progress bar, logging or checkpoints; sequential sampler; CPU."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=1,
        max_steps=total,
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


def timed_train(trainer, loop, variants, switch, a):
    """Train with the timing callbacks; the loop runs one block after every trainer block."""
    clock = Clock(variants, a.block, loop, switch, a.warmup, a.profile)
    trainer.remove_callback(PrinterCallback)  # no end-of-training print (outside the timed region anyway)
    trainer.callback_handler.callbacks.insert(0, StepBegin(clock))
    trainer.add_callback(StepEnd(clock))
    # warm-up steps of the loop before the first block (the trainer's warm-up steps are not recorded)
    loop.run(a.warmup)
    loop.step_times.clear()
    loop.iter_times.clear()
    trainer.train()
    # a later variant's first step is its own warm-up and is dropped
    result = {"loop": median_ms(loop.step_times, 0), "loop_iter": median_ms(loop.iter_times, 0),
              "n_loop": len(loop.step_times), "n_trainer": {}}
    for i, v in enumerate(variants):
        result[v] = median_ms(clock.step_times[v], 0 if i == 0 else 1)
        result[v + "_iter"] = median_ms(clock.iter_times[v], 0 if i == 0 else 1)
        result["n_trainer"][v] = len(clock.step_times[v])
    for v, profiler in clock.profilers.items():
        for order in ("cumulative", "tottime"):
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(a.profile_lines)
            result.setdefault("profiles", []).append((f"{v}, {clock.profiled[v]} steps, sorted by {order}",
                                                      stream.getvalue()))
    loop.step_times.clear()
    loop.iter_times.clear()
    return result


def run_case(name, a, student, teacher, batches, task, variants, output_dir):
    block = a.block
    total = (math.ceil(a.warmup / block) + a.rounds * len(variants)) * block
    student_hw = copy.deepcopy(student) if a.hand_written else None  # same initial weights
    args = DistillationArguments(
        **common_args(os.path.join(output_dir, "hf_kd"), total),
        hard_label_weight=a.hard_weight,
        distillers=[{"name": "kl", "temperature": a.temperature, "weight": a.kd_weight}],
    )
    optimizer_kwargs = trainer_optimizer_kwargs(args)
    loop = PlainLoop(copy.deepcopy(student), copy.deepcopy(teacher), batches, total, task, a, optimizer_kwargs)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=PrebuiltBatches(batches[:total]), data_collator=unwrap_collator,
    )

    def switch(variant):
        if variant in ("fused", "unfused"):
            if not hasattr(trainer, "_fused_lm"):
                raise SystemExit("DistillationTrainer has no `_fused_lm` flag any more; update benchmarks/overhead.py")
            trainer._fused_lm = variant == "fused"

    if "fused" in variants and not trainer._fused_lm:
        raise SystemExit("The trainer did not pick the fused LM path; check the model (linear head, no softcapping).")
    check_same_loss(trainer, loop, batches[0], variants, switch)
    switch(variants[0])
    result = {"name": name, "phases": [(variants, timed_train(trainer, loop, variants, switch, a))]}

    if a.hand_written:
        # phase 2: a bare Trainer with a hand-written compute_loss, interleaved with the same loop
        total_hw = (math.ceil(a.warmup / block) + a.rounds) * block
        hw = HandWrittenKDTrainer(
            model=student_hw, args=TrainingArguments(**common_args(os.path.join(output_dir, "hw"), total_hw)),
            train_dataset=PrebuiltBatches(batches[:total_hw]), data_collator=unwrap_collator,
            teacher_model=teacher, task=task, bench_args=a,
        )
        result["phases"].append((["hand_written"], timed_train(hw, loop, ["hand_written"], lambda v: None, a)))
    return result


LABELS = {"trainer": "DistillationTrainer", "fused": "hf_kd fused LM loss", "unfused": "hf_kd unfused",
          "hand_written": "Trainer+hand-written"}


def report(r):
    print(f"\n== {r['name']} ==")
    for variants, phase in r["phases"]:
        print(f"  plain loop            : {phase['loop']:8.2f} ms/step   (n={phase['n_loop']}; full iteration "
              f"{phase['loop_iter']:.2f} ms)")
        for v in variants:
            print(
                f"  {LABELS[v]:<22}: {phase[v]:8.2f} ms/step   ratio {phase[v] / phase['loop']:.3f}   "
                f"(n={phase['n_trainer'][v]}; full iteration {phase[v + '_iter']:.2f} ms, ratio "
                f"{phase[v + '_iter'] / phase['loop_iter']:.3f})"
            )
        if "fused" in variants and "unfused" in variants:
            print(f"  fused / unfused       : {phase['fused'] / phase['unfused']:.3f}")
        for title, text in phase.get("profiles", []):
            print(f"\n-- cProfile of trainer steps: {title} --\n{text}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cls,lm", help="comma list of: cls, lm")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides (1: robust when other processes load the CPU)")
    p.add_argument("--rounds", type=int, default=6, help="blocks per side (per trainer variant)")
    p.add_argument("--block", type=int, default=3, help="steps per block")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each side")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hard-weight", type=float, default=0.5, help="hard_label_weight")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the kl distiller")
    p.add_argument("--no-unfused", action="store_true", help="LM: only the default fused path")
    p.add_argument("--no-hand-written", dest="hand_written", action="store_false",
                   help="skip the second phase: a bare transformers.Trainer with a hand-written KD compute_loss "
                        "(it splits the overhead between Trainer/Accelerate and hf_kd)")
    # classifier
    p.add_argument("--cls-batch", type=int, default=16)
    p.add_argument("--cls-seq", type=int, default=64)
    p.add_argument("--cls-vocab", type=int, default=30522)
    p.add_argument("--cls-labels", type=int, default=4)
    p.add_argument("--cls-hidden", type=int, default=256)
    p.add_argument("--cls-layers", type=int, default=4)
    p.add_argument("--cls-teacher-hidden", type=int, default=384)
    p.add_argument("--cls-teacher-layers", type=int, default=4)
    # causal LM
    p.add_argument("--lm-batch", type=int, default=4)
    p.add_argument("--lm-seq", type=int, default=128)
    p.add_argument("--lm-vocab", type=int, default=16384)
    p.add_argument("--lm-hidden", type=int, default=256)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--lm-teacher-hidden", type=int, default=384)
    p.add_argument("--lm-teacher-layers", type=int, default=4)
    p.add_argument("--profile", type=int, default=0, help="cProfile this many trainer steps per variant and print")
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
            report(r)
            print(f"  (wall {r['wall']:.0f} s)")
            results.append(r)
    print("\nSummary (median step time / median plain-loop step time, interleaved; target <= 1.05):")
    for r in results:
        for variants, phase in r["phases"]:
            for v in variants:
                print(f"  {r['name'].split(':')[0]:<11} {LABELS[v]:<22} {phase[v] / phase['loop']:.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

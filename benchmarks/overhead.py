"""Step-time overhead of ``hf_kd.DistillationTrainer`` against a plain PyTorch loop doing the same math.

Both sides train identical copies of the same student (same initial weights) against the same frozen teacher on
the same pre-built batches, with the Trainer's defaults:

- loss = ``hard_label_weight * CE(student, labels) + kd_weight * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``
  (mean over samples for the classifier, over tokens whose shifted label is not -100 for the causal LM);
- teacher forward under ``torch.inference_mode()``; student forward + backward; all fp32;
- ``clip_grad_norm_(..., 1.0)``; ``torch.optim.AdamW`` built with exactly the kwargs the Trainer uses for its
  ``args.optim`` (transformers 5 on torch >= 2.8 defaults to ``adamw_torch_fused``, i.e. ``fused=True``;
  lr 5e-5, betas (0.9, 0.999), eps 1e-8) and the Trainer's ``weight_decay`` 0.0 passed explicitly (torch's own
  AdamW default is 0.01); linear LR decay to 0 over the run, no warmup.

Cases (``--models``, default all three):

- ``cls``: BERT classifier, student 4x256 / teacher 4x384, distiller ``kl``;
- ``lm``: Llama causal LM, student 4x256 / teacher 4x384, distiller ``kl``, fused and unfused LM loss;
- ``repr``: the ``cls`` pair with ``attn_implementation="eager"`` and ``--repr-heads`` (4) heads in both models,
  distillers ``kl`` + ``hidden_states`` (uniform layer map, MSE over all non-padding tokens, one linear projector
  256 -> 384 shared by all layers, built by the distiller) + ``attention`` (KL per query row, uniform map). The loop
  runs both models with ``output_hidden_states``/``output_attentions`` and adds :func:`repr_loss` (written out by
  hand) with its own ``nn.Linear(256, 384)`` projector whose initial weights are copied from the distiller's
  (``trainer.distillers[1].projectors["shared"]``). The projector is in the loop's AdamW as a second param group
  (the Trainer puts distiller parameters in their own group with the same lr / weight decay) and, as in the
  Trainer, outside gradient clipping, which covers the student's parameters only.

Data: ``batches`` is a list of dicts of tensors built once. The Trainer gets a map-style dataset whose item ``i``
is ``batches[i]`` itself, ``per_device_train_batch_size=1``, ``train_sampling_strategy="sequential"`` and a
collator that returns ``features[0]`` unchanged, so its data work is handing over an already-built batch, just as
the loop's ``batches[i]``. (The fetch is outside the timed region on both sides anyway.)

Timing: the Trainer step is the region between ``on_step_begin`` and ``on_step_end`` (forward, backward, clipping,
optimizer and scheduler step, ``zero_grad`` and Trainer's per-step bookkeeping). A timing callback is put *first*
in the callback list for ``on_step_begin`` and *last* for ``on_step_end``, so hf_kd's internal
step callback (``StepCallback``) is inside the timed region. The loop is timed around the same work.

Interleaving: inside the Trainer's last ``on_step_end`` of every block of ``--block`` steps the plain loop runs
``--block`` steps, so the two alternate in blocks for the whole run (``--rounds`` blocks each). The first
``--warmup`` steps of each side are dropped. For the LM, the Trainer alternates blocks with the fused LM loss on
and off (``fused_lm_loss=True`` is the default; the switch flips the trainer's ``_fused_lm`` flag between blocks,
the same flag ``DistillationArguments.fused_lm_loss`` sets), so fused / unfused / plain are all interleaved.

Also reported: the full iteration time (begin of step k to begin of step k+1 inside a block), which adds the
Trainer's dataloader, logging and callbacks around the step; and the median CPU time of the same step region
(``time.process_time()``, all threads of the process). With one intra-op thread, CPU time leaves out the time the
process waits while other jobs hold the cores, so on a loaded machine its ratio is the steadier of the two
(the wall-clock ratio stays the headline figure).

Second phase (on by default, ``--no-hand-written`` skips it): a bare ``transformers.Trainer`` whose
``compute_loss`` is the loop's loss (for ``repr`` with its own copy of the projector in an extra param group),
timed the same way and interleaved with the same loop. Its ratio is what Trainer + Accelerate cost by themselves;
the difference to the DistillationTrainer ratio is hf_kd's share.

Every case first checks that the trainer's loss equals the loop's on the first batch (same weights, and for
``repr`` the same projector weights).

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
from torch import nn
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
def build_classifier(a, teacher: bool, seed: int, heads: int | None = None, attn_implementation: str | None = None):
    torch.manual_seed(seed)
    hidden = a.cls_teacher_hidden if teacher else a.cls_hidden
    layers = a.cls_teacher_layers if teacher else a.cls_layers
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = BertConfig(
        vocab_size=a.cls_vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads or max(hidden // 64, 1),
        intermediate_size=4 * hidden, max_position_embeddings=max(512, a.cls_seq), num_labels=a.cls_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # deterministic, so the loss check below is exact
        **extra,
    )
    return BertForSequenceClassification(config)


def build_repr_classifier(a, teacher: bool, seed: int):
    """The classifier pair of ``cls`` with eager attention (maps are returned) and ``--repr-heads`` heads in both."""
    model = build_classifier(a, teacher, seed, heads=a.repr_heads, attn_implementation="eager")
    if model.config._attn_implementation != "eager":
        raise SystemExit(f"Expected eager attention, got {model.config._attn_implementation!r}.")
    return model


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


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """TinyBERT's uniform map, student layer ``m`` -> teacher layer ``m * N // M`` (``m = 1..M``; 0 = embeddings)."""
    return {m: m * teacher_layers // student_layers for m in range(1, student_layers + 1)}


def repr_loss(s_out, t_out, attention_mask, projector, layer_map, a):
    """``hidden_weight * L_hidden + attention_weight * L_attention``, written the straightforward way.

    ``L_hidden``: mean over mapped layers of the MSE between ``projector(h_s)`` and ``h_t`` (mean over the feature
    dimension), averaged over non-padding tokens. ``L_attention``: mean over mapped layers of ``KL(A_t[i, :] ||
    A_s[i, :])`` per query row, averaged over heads and non-padding query rows.
    """
    mask = attention_mask.float()
    hidden = []
    for s, t in layer_map.items():
        per_token = (projector(s_out.hidden_states[s]) - t_out.hidden_states[t]).pow(2).mean(-1)
        hidden.append((per_token * mask).sum() / mask.sum())
    rows = mask[:, None, :, None]  # valid query rows
    attention = []
    for s, t in layer_map.items():
        a_s = s_out.attentions[s - 1]
        # the teacher ran under inference_mode, and kl_div saves its target for backward: a normal copy is needed
        a_t = t_out.attentions[t - 1].clone()
        kl = F.kl_div(a_s.clamp_min(1e-12).log(), a_t, reduction="none").sum(-1, keepdim=True)
        attention.append((kl * rows).sum() / (rows.sum() * a_s.shape[1]))
    return a.hidden_weight * torch.stack(hidden).mean() + a.attention_weight * torch.stack(attention).mean()


REPR_FLAGS = {"output_hidden_states": True, "output_attentions": True}


class HandWrittenKDTrainer(Trainer):
    """A bare ``transformers.Trainer`` whose ``compute_loss`` is :func:`kd_loss` (the usual hand-written KD trainer).

    Only used to split the overhead into what ``Trainer``/Accelerate cost and what hf_kd adds on top.
    """

    def __init__(self, *args, teacher_model=None, task=None, bench_args=None, projector=None, layer_map=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.task, self.bench_args = teacher_model.eval().requires_grad_(False), task, bench_args
        self.projector, self.layer_map = projector, layer_map  # repr case: the hidden-state projector

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.projector is not None:  # its own param group, as hf_kd does for distiller parameters
            optimizer.add_param_group({"params": list(self.projector.parameters()),
                                       "weight_decay": self.args.weight_decay})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        flags = REPR_FLAGS if self.projector is not None else {}
        if self.projector is not None:
            self.projector.zero_grad(set_to_none=True)  # Trainer only zeroes the model's gradients
        with torch.inference_mode():
            t_out = self.teacher(**model_inputs, **flags)
        outputs = model(**model_inputs, **flags)
        loss = kd_loss(outputs.logits, t_out.logits, inputs["labels"], self.task, self.bench_args)
        if self.projector is not None:
            loss = loss + repr_loss(outputs, t_out, inputs["attention_mask"], self.projector, self.layer_map,
                                    self.bench_args)
        return (loss, outputs) if return_outputs else loss


class PlainLoop:
    """Same math as the trainer, written the straightforward way (full logits, fp32 log_softmax).

    With a ``projector`` (repr case) the loss adds :func:`repr_loss`; the projector is trained in its own param
    group (same lr / weight decay) and, as in the Trainer, left out of gradient clipping, which covers the student.
    """

    def __init__(self, student, teacher, batches, total_steps, task, a, optimizer_kwargs, projector=None,
                 layer_map=None):
        self.student, self.teacher, self.batches, self.task, self.a = student, teacher, batches, task, a
        self.projector, self.layer_map = projector, layer_map
        self.student.train()
        self.teacher.eval().requires_grad_(False)
        groups = [{"params": list(self.student.parameters())}]
        if projector is not None:
            projector.train()
            groups.append({"params": list(projector.parameters())})
        self.optimizer = torch.optim.AdamW(groups, **optimizer_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: max(0.0, (total_steps - s) / max(1, total_steps))
        )
        self.i = 0
        self.step_times: list[float] = []
        self.cpu_times: list[float] = []
        self.iter_times: list[float] = []

    def loss(self, batch):
        model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.projector is not None:
            with torch.inference_mode():
                t_out = self.teacher(**model_inputs, **REPR_FLAGS)
            s_out = self.student(**model_inputs, **REPR_FLAGS)
            return kd_loss(s_out.logits, t_out.logits, batch["labels"], self.task, self.a) + repr_loss(
                s_out, t_out, batch["attention_mask"], self.projector, self.layer_map, self.a
            )
        with torch.inference_mode():
            t_logits = self.teacher(**model_inputs).logits
        s_logits = self.student(**model_inputs).logits
        return kd_loss(s_logits, t_logits, batch["labels"], self.task, self.a)

    def run(self, steps: int):
        previous = None
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            start, cpu_start = time.perf_counter(), time.process_time()
            if previous is not None:
                self.iter_times.append(start - previous)
            previous = start
            loss = self.loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)  # student and projector
            self.step_times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)


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
        self.cpu_times = {v: [] for v in self.variants}
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
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        if self.profiling:
            self.profilers[v].enable()

    def end(self):
        elapsed, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        v = self.variant
        if self.profiling:
            self.profilers[v].disable()
            self.profiled[v] += 1
        elif self.count >= self.warmup:
            self.step_times[v].append(elapsed)
            self.cpu_times[v].append(cpu)
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
    # Trainer sets weight decay per param group (args.weight_decay, 0.0 for biases/norms; both 0.0 by default);
    # torch.optim.AdamW's own default is 0.01, so it has to be passed explicitly.
    if args.weight_decay != 0.0:
        raise SystemExit("This benchmark mirrors one weight decay for all parameters; keep weight_decay=0.0.")
    return {**kwargs, "weight_decay": args.weight_decay}


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
    loop.cpu_times.clear()
    loop.iter_times.clear()
    trainer.train()
    # a later variant's first step is its own warm-up and is dropped
    result = {"loop": median_ms(loop.step_times, 0), "loop_iter": median_ms(loop.iter_times, 0),
              "loop_cpu": median_ms(loop.cpu_times, 0), "n_loop": len(loop.step_times), "n_trainer": {}}
    for i, v in enumerate(variants):
        result[v] = median_ms(clock.step_times[v], 0 if i == 0 else 1)
        result[v + "_iter"] = median_ms(clock.iter_times[v], 0 if i == 0 else 1)
        result[v + "_cpu"] = median_ms(clock.cpu_times[v], 0 if i == 0 else 1)
        result["n_trainer"][v] = len(clock.step_times[v])
    for v, profiler in clock.profilers.items():
        for order in ("cumulative", "tottime"):
            stream = io.StringIO()
            pstats.Stats(profiler, stream=stream).sort_stats(order).print_stats(a.profile_lines)
            result.setdefault("profiles", []).append((f"{v}, {clock.profiled[v]} steps, sorted by {order}",
                                                      stream.getvalue()))
    loop.step_times.clear()
    loop.cpu_times.clear()
    loop.iter_times.clear()
    return result


def run_case(name, a, student, teacher, batches, task, variants, output_dir, representation=False):
    block = a.block
    total = (math.ceil(a.warmup / block) + a.rounds * len(variants)) * block
    student_hw = copy.deepcopy(student) if a.hand_written else None  # same initial weights
    student_loop, teacher_loop = copy.deepcopy(student), copy.deepcopy(teacher)
    distillers = [{"name": "kl", "temperature": a.temperature, "weight": a.kd_weight}]
    if representation:
        distillers += [
            {"name": "hidden_states", "weight": a.hidden_weight, "layer_map": "uniform", "loss": "mse",
             "tokens": "all", "projector": "linear"},
            {"name": "attention", "weight": a.attention_weight, "layer_map": "uniform", "loss": "kl"},
        ]
    args = DistillationArguments(
        **common_args(os.path.join(output_dir, "hf_kd"), total),
        hard_label_weight=a.hard_weight,
        distillers=distillers,
    )
    optimizer_kwargs = trainer_optimizer_kwargs(args)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args,
        train_dataset=PrebuiltBatches(batches[:total]), data_collator=unwrap_collator,
    )
    projector = projector_hw = layer_map = None
    if representation:
        # the loop's projector starts from the distiller's own (built in setup() from the global RNG)
        shared = trainer.distillers[1].projectors["shared"]
        projector = nn.Linear(shared.in_features, shared.out_features)
        projector.load_state_dict(shared.state_dict())
        projector_hw = copy.deepcopy(projector)
        layer_map = uniform_layer_map(a.cls_layers, a.cls_teacher_layers)
        if layer_map != trainer.distillers[1].layer_map or layer_map != trainer.distillers[2].layer_map:
            raise SystemExit(f"layer maps differ: loop {layer_map}, trainer {trainer.distillers[1].layer_map}")
    loop = PlainLoop(student_loop, teacher_loop, batches, total, task, a, optimizer_kwargs, projector, layer_map)

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
            teacher_model=teacher, task=task, bench_args=a, projector=projector_hw, layer_map=layer_map,
        )
        result["phases"].append((["hand_written"], timed_train(hw, loop, ["hand_written"], lambda v: None, a)))
    return result


LABELS = {"trainer": "DistillationTrainer", "fused": "hf_kd fused LM loss", "unfused": "hf_kd unfused",
          "hand_written": "Trainer+hand-written"}


def report(r):
    print(f"\n== {r['name']} ==")
    for variants, phase in r["phases"]:
        print(f"  plain loop            : {phase['loop']:8.2f} ms/step   (n={phase['n_loop']}; full iteration "
              f"{phase['loop_iter']:.2f} ms; CPU {phase['loop_cpu']:.2f} ms)")
        for v in variants:
            print(
                f"  {LABELS[v]:<22}: {phase[v]:8.2f} ms/step   ratio {phase[v] / phase['loop']:.3f}   "
                f"(n={phase['n_trainer'][v]}; full iteration {phase[v + '_iter']:.2f} ms, ratio "
                f"{phase[v + '_iter'] / phase['loop_iter']:.3f}; CPU {phase[v + '_cpu']:.2f} ms, ratio "
                f"{phase[v + '_cpu'] / phase['loop_cpu']:.3f})"
            )
        if "fused" in variants and "unfused" in variants:
            print(f"  fused / unfused       : {phase['fused'] / phase['unfused']:.3f}")
        for title, text in phase.get("profiles", []):
            print(f"\n-- cProfile of trainer steps: {title} --\n{text}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cls,lm,repr", help="comma list of: cls, lm, repr")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for both sides (1: robust when other processes load the CPU)")
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
    # representation distillation (the classifier sizes above, eager attention)
    p.add_argument("--repr-heads", type=int, default=4, help="attention heads of both models in the repr case")
    p.add_argument("--hidden-weight", type=float, default=1.0, help="repr: weight of the hidden_states distiller")
    p.add_argument("--attention-weight", type=float, default=1.0, help="repr: weight of the attention distiller")
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
    print(f"rounds={a.rounds} block={a.block} warmup={a.warmup} T={a.temperature} hard={a.hard_weight} "
          f"kd={a.kd_weight}")
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
            elif which == "repr":
                variants = ["trainer"]
                student, teacher = build_repr_classifier(a, False, 0), build_repr_classifier(a, True, 1)
                n = a.warmup + a.rounds * a.block * len(variants) + 1
                batches = classifier_batches(a, n)
                name = (f"representation: BERT student {a.cls_layers}x{a.cls_hidden} / teacher "
                        f"{a.cls_teacher_layers}x{a.cls_teacher_hidden}, {a.repr_heads} heads each, eager attention, "
                        f"batch {a.cls_batch} x seq {a.cls_seq}; kl + hidden_states (mse, linear projector) + "
                        f"attention (kl)")
                task = "classification"
            else:
                raise SystemExit(f"unknown model {which!r}")
            start = time.perf_counter()
            r = run_case(name, a, student, teacher, batches, task, variants, os.path.join(tmp, which),
                         representation=which == "repr")
            r["wall"] = time.perf_counter() - start
            report(r)
            print(f"  (wall {r['wall']:.0f} s)")
            results.append(r)
    print("\nSummary (median step time / median plain-loop step time, interleaved; "
          "target <= 1.05 for classifier / causal LM, <= 1.10 for representation):")
    print(f"  {'case':<14} {'trainer':<22} {'wall':>6} {'CPU':>6}")
    for r in results:
        for variants, phase in r["phases"]:
            for v in variants:
                print(f"  {r['name'].split(':')[0]:<14} {LABELS[v]:<22} {phase[v] / phase['loop']:6.3f} "
                      f"{phase[v + '_cpu'] / phase['loop_cpu']:6.3f}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

"""Peak memory and time of the token-level distillation loss (forward + backward) at LM vocabulary sizes.

Variants, all computing the same thing — ``KL(p_t^T || p_s^T) * T^2`` per predicted token (causal shift), masked by
``labels != -100``, averaged over those tokens, then ``backward()`` into the student's hidden states and head
weight — from the same inputs (student hidden ``[B, T, H]`` + head ``[V, H]``, teacher hidden + head, labels):

``plain``      the straightforward implementation: full student logits ``hidden @ W.T``, full teacher logits
               (no grad), fp32 ``log_softmax`` of both, ``kl_div`` per token, mask, mean, backward.
``hf_kd_head`` hf_kd's fused path: ``hf_kd.row_loss.row_losses`` with ``LogitSource(hidden, W)`` for both models,
               so logits exist one chunk of ``--chunk-size`` rows at a time (default: the trainer's, sized from the
               vocabulary; the trainer's default for causal LMs).
``hf_kd_logits`` hf_kd from full logits (the trainer's path when ``fused_lm_loss=False``): full logits are formed
               as in ``plain``, then ``row_losses`` with ``LogitSource(logits)``.

Memory: each measurement runs in a fresh subprocess started with ``MALLOC_MMAP_THRESHOLD_=131072``, so glibc serves
every block of 128 KiB or more with its own ``mmap`` and gives it back on ``free``: the resident set then follows
the live tensors instead of keeping freed heap blocks (with glibc's default, adaptive threshold, blocks under
32 MiB stay in the heap after ``free`` and the peak RSS depends on fragmentation). After the inputs are allocated
the child reads ``VmRSS``, resets the kernel's peak mark (``echo 5 > /proc/self/clear_refs``; where that is not
possible, ``ru_maxrss`` of the fresh process is used), runs the loss once (forward + backward) and reports
``VmHWM - baseline``: the extra memory the loss needed at its peak (inputs excluded; gradients of the inputs
included).

Time: in separate subprocesses with the default allocator; the median over warm runs (each child does one cold run,
then ``--reps`` timed runs). Children of the variants alternate for ``--rounds`` rounds, so background load hits
all variants alike.

``--check`` first compares loss and gradients of the three variants at a small size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_kd.row_loss import rows_per_chunk

VARIANTS = ("plain", "hf_kd_head", "hf_kd_logits")


# ----------------------------------------------------------------------------------------------------------------
# inputs and the three implementations
# ----------------------------------------------------------------------------------------------------------------
def make_inputs(batch, seq, vocab, hidden, teacher_hidden, pad_fraction, seed=0):
    g = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(batch, seq, hidden, generator=g).requires_grad_()
    s_weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    t_hidden = torch.randn(batch, seq, teacher_hidden, generator=g)
    t_weight = torch.randn(vocab, teacher_hidden, generator=g) / teacher_hidden**0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    padded = int(seq * pad_fraction)
    if padded:
        labels[::2, seq - padded :] = -100  # right padding in every other row
    return s_hidden, s_weight, t_hidden, t_weight, labels


def plain_loss(s_hidden, s_weight, t_hidden, t_weight, labels, temperature, chunk_size):
    s_logits = s_hidden @ s_weight.T  # [B, T, V]
    with torch.no_grad():
        t_logits = t_hidden @ t_weight.T
    s = s_logits[:, :-1].float()
    t = t_logits[:, :-1].float()
    mask = labels[:, 1:] != -100
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # [B, T-1]
    return (kl * mask).sum() / mask.sum() * temperature**2


def _kl_term(temperature):
    from hf_kd.distillers.logit import KLDistiller
    from hf_kd.row_loss import RowTerm

    distiller = KLDistiller(temperature=temperature)
    return RowTerm("kl", distiller.row_loss, 1.0)


def hf_kd_head_loss(s_hidden, s_weight, t_hidden, t_weight, labels, temperature, chunk_size):
    from hf_kd.row_loss import LogitSource, causal_lm_rows, row_losses

    rows, targets = causal_lm_rows(labels, None, None, labels.shape)
    total, _ = row_losses(
        [_kl_term(temperature)], LogitSource(s_hidden, s_weight), LogitSource(t_hidden, t_weight), rows, targets,
        s_weight.shape[0], max(rows.numel(), 1), chunk_size,
    )
    return total


def hf_kd_logits_loss(s_hidden, s_weight, t_hidden, t_weight, labels, temperature, chunk_size):
    from hf_kd.row_loss import LogitSource, causal_lm_rows, row_losses

    s_logits = s_hidden @ s_weight.T
    with torch.no_grad():
        t_logits = t_hidden @ t_weight.T
    rows, targets = causal_lm_rows(labels, None, None, labels.shape)
    total, _ = row_losses(
        [_kl_term(temperature)], LogitSource(s_logits), LogitSource(t_logits), rows, targets,
        s_weight.shape[0], max(rows.numel(), 1), chunk_size,
    )
    return total


LOSSES = {"plain": plain_loss, "hf_kd_head": hf_kd_head_loss, "hf_kd_logits": hf_kd_logits_loss}


# ----------------------------------------------------------------------------------------------------------------
# the child: one variant, memory + time
# ----------------------------------------------------------------------------------------------------------------
def _status_kb(key):
    match = re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)
    return int(match.group(1)) if match else None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(a):
    torch.set_num_threads(a.threads)
    import hf_kd.row_loss  # noqa: F401  (import cost and its allocations before the baseline)

    inputs = make_inputs(a.batch, a.seq, a.vocab, a.hidden, a.teacher_hidden, a.pad_fraction)
    fn = LOSSES[a.variant]
    baseline = _status_kb("VmRSS")
    can_reset = _reset_peak()
    peaks, times = [], []
    for _i in range(1 if a.memory else 1 + a.reps):
        for t in inputs[:2]:
            t.grad = None
        start = time.perf_counter()
        loss = fn(*inputs, a.temperature, a.chunk_size)
        loss.backward()
        elapsed = time.perf_counter() - start
        del loss
        peak = _status_kb("VmHWM") if can_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peaks.append(peak - baseline)
        times.append(elapsed)
    print(json.dumps({"variant": a.variant, "peak_kb": max(peaks), "cold_s": times[0], "warm_s": times[1:],
                      "peak_method": "VmHWM after clear_refs" if can_reset else "ru_maxrss"}))


# ----------------------------------------------------------------------------------------------------------------
# the check and the parent
# ----------------------------------------------------------------------------------------------------------------
def check(a):
    results = {}
    for name, fn in LOSSES.items():
        inputs = make_inputs(2, 33, 1000, 64, 48, 0.25, seed=3)
        loss = fn(*inputs, a.temperature, 7)  # 7-row chunks: many chunks
        loss.backward()
        results[name] = (loss.detach(), inputs[0].grad, inputs[1].grad)
    ref = results["plain"]
    for name, (loss, g_hidden, g_weight) in results.items():
        errors = [(loss - ref[0]).abs().item(), (g_hidden - ref[1]).abs().max().item(),
                  (g_weight - ref[2]).abs().max().item()]
        ok = all(e < 1e-5 for e in errors)
        print(f"check {name:<13} loss {loss.item():.6f}  max|d loss| {errors[0]:.1e}  "
              f"max|d grad hidden| {errors[1]:.1e}"
              f"  max|d grad W| {errors[2]:.1e}  {'OK' if ok else 'MISMATCH'}")
        if not ok:
            raise SystemExit("variants disagree")


def run_child(a, variant, memory):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant]
    cmd += ["--memory"] if memory else []
    env = dict(os.environ)
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    for key in ("batch", "seq", "vocab", "hidden", "teacher_hidden", "threads", "reps", "chunk_size", "temperature",
                "pad_fraction"):
        if getattr(a, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(a, key))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"child {variant} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576, help="student hidden size (SmolLM2-135M: 576)")
    p.add_argument("--teacher-hidden", type=int, default=576)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="rows per chunk; default: the trainer's, sized from the vocabulary "
                   "(hf_kd.row_loss.rows_per_chunk)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--pad-fraction", type=float, default=0.125, help="label -100 tail in every other row")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="subprocesses per variant (variants alternate)")
    p.add_argument("--reps", type=int, default=2, help="timed warm runs per subprocess (after one cold run)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--memory-only", action="store_true", help="skip the timing subprocesses")
    p.add_argument("--check", action="store_true", help="first check that the variants agree (small size)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)

    print(f"torch {torch.__version__}, threads {a.threads}, cpu count {os.cpu_count()}")
    if a.check:
        check(a)
    rows = a.batch * (a.seq - 1)
    gib = a.batch * a.seq * a.vocab * 4 / 2**30
    print(f"B={a.batch} T={a.seq} V={a.vocab} H={a.hidden} (teacher H={a.teacher_hidden}), "
          f"chunk {rows_per_chunk(a.vocab, a.chunk_size)} rows, "
          f"T={a.temperature}; one fp32 [B, T, V] tensor = {gib:.3f} GiB; ~{rows} predicted tokens")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    collected = {v: [] for v in variants}
    memory = {v: [] for v in variants}
    for r in range(a.rounds):
        for v in variants:
            result = run_child(a, v, memory=True)
            memory[v].append(result)
            print(f"  round {r + 1} {v:<13} memory run: peak +{result['peak_kb'] / 2**20:.3f} GiB", flush=True)
            if a.memory_only:
                continue
            result = run_child(a, v, memory=False)
            collected[v].append(result)
            print(f"  round {r + 1} {v:<13} time runs: cold {result['cold_s']:.2f} s, warm "
                  f"{', '.join(f'{t:.2f}' for t in result['warm_s'])} s", flush=True)
    summary = {}
    for v, results in collected.items():
        peak = statistics.median(r["peak_kb"] for r in memory[v]) / 2**20
        warm = [t for r in results for t in r["warm_s"]]
        cold = [r["cold_s"] for r in results]
        summary[v] = (peak, statistics.median(warm) if warm else statistics.median(cold) if cold else float("nan"))
    print(f"\n{'variant':<14}{'peak extra memory':>20}{'x plain':>9}{'median time':>14}{'x plain':>9}")
    for v, (peak, seconds) in summary.items():
        rel_mem = peak / summary["plain"][0] if "plain" in summary else float("nan")
        rel_t = seconds / summary["plain"][1] if "plain" in summary else float("nan")
        timing = f"{seconds:>12.2f} s{rel_t:>9.3f}" if seconds == seconds else f"{'-':>14}{'-':>9}"
        print(f"{v:<14}{peak:>16.3f} GiB{rel_mem:>9.3f}{timing}")
    print(f"(peak method: {memory[variants[0]][0]['peak_method']}, MALLOC_MMAP_THRESHOLD_=131072; "
          "targets for hf_kd_head: memory <= 0.25x, "
          f"time <= 1.0x plain)")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])

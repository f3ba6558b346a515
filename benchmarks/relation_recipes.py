"""Each relation distiller added to logit KD on the ViT digits recipe: accuracy (mean over seeds) against ``kl`` alone
and against no KD, and the step-time ratio against ``kl`` alone.

Per seed the recipe's defaults run once with ``kl`` (T=2, plus cross-entropy) and its baseline (cross-entropy only,
"no KD"), then once per relation distiller with ``[kl, <relation>]`` (the relation at its default options and
weight 1). The teacher is trained once and cached by the recipe. Step time is the distillation phase's train
seconds per optimizer step. Run::

    python benchmarks/relation_recipes.py --seeds 0 1 2
    python benchmarks/relation_recipes.py --seeds 0 --max_steps 20 --relations rkd sp     # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from vit_image_classification import RECIPE  # noqa: E402

from hf_kd.distillers.base import _REGISTRY  # noqa: E402

RELATIONS = sorted(n for n, c in _REGISTRY.items() if c.family == "relation" and c.__module__.startswith("hf_kd."))
KL = {"name": "kl", "temperature": 2.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--relations", nargs="+", default=RELATIONS, choices=RELATIONS)
    parser.add_argument("--max_steps", type=int, default=-1,
                        help="At most this many steps per phase (-1: the recipe's).")
    parser.add_argument("--output_dir", default="outputs/relation_recipes")
    parser.add_argument("--json", default=None, help="Also write every run's figures to this JSON file.")
    return parser.parse_args(argv)


def run(cli: argparse.Namespace, seed: int, distillers: list[dict], baseline: bool) -> dict:
    name = "+".join(d["name"] for d in distillers)
    args, training_args = RECIPE.parse_dict({
        "seed": seed, "distillers": distillers, "baseline": baseline, "max_steps": cli.max_steps,
        "output_dir": f"{cli.output_dir}/{name}-seed{seed}", "eval_strategy": "no", "logging_steps": 100,
    })
    out = RECIPE.run(args, training_args)
    student = out["results"]["student"]
    steps = max(log.get("step", 0) for log in out["histories"]["distillation"])
    row = {"seed": seed, "distillers": name, "accuracy": student.metrics["accuracy"],
           "step_ms": 1000 * student.train_seconds / steps}
    if baseline:
        row["no_kd_accuracy"] = out["results"]["baseline"].metrics["accuracy"]
    return row


def table(rows: list[dict], relations: list[str]) -> str:
    by = {name: [r for r in rows if r["distillers"] == name] for name in ["kl", *(f"kl+{x}" for x in relations)]}
    kl_ms = statistics.mean(r["step_ms"] for r in by["kl"])
    no_kd = statistics.mean(r["no_kd_accuracy"] for r in by["kl"])
    per_seed = ", ".join(f"{100 * r['no_kd_accuracy']:.1f}" for r in by["kl"])
    lines = ["| distillers | accuracy (mean) | per seed | vs kl | vs no KD | step time vs kl |",
             "|---|---|---|---|---|---|", f"| none (CE only) | {100 * no_kd:.1f} | {per_seed} | | | |"]
    kl_acc = statistics.mean(r["accuracy"] for r in by["kl"])
    for name, runs in by.items():
        acc = statistics.mean(r["accuracy"] for r in runs)
        ms = statistics.mean(r["step_ms"] for r in runs)
        lines.append(f"| {name} | {100 * acc:.1f} | " + ", ".join(f"{100 * r['accuracy']:.1f}" for r in runs)
                     + f" | {100 * (acc - kl_acc):+.1f} | {100 * (acc - no_kd):+.1f} | {ms / kl_ms:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parse_args(argv)
    start, rows = time.perf_counter(), []
    for seed in cli.seeds:
        rows.append(run(cli, seed, [KL], baseline=True))
        print(json.dumps(rows[-1]), flush=True)
        for relation in cli.relations:
            rows.append(run(cli, seed, [KL, {"name": relation}], baseline=False))
            print(json.dumps(rows[-1]), flush=True)
    print("\nViT digits, test accuracy (%) on the 360 held-out images:\n" + table(rows, cli.relations))
    print(f"Wall time {time.perf_counter() - start:.0f} s.")
    if cli.json:
        Path(cli.json).write_text(json.dumps({"args": vars(cli), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the recipe: tiny models, shared CPU
    main()

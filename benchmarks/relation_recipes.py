"""Each relation distiller added to logit KD on a recipe (the ViT digits or the BBC News text one): accuracy (mean
over seeds) against ``kl`` alone and against no KD, and the step-time ratio against ``kl`` alone.

Per seed the recipe's defaults run once with ``kl`` (T=2, plus cross-entropy) and its baseline (cross-entropy only,
"no KD"), then once per relation distiller with ``[kl, <relation>]`` (the relation at its default options and its
default weight, or at each of ``--weights``). The teacher is trained once per seed and cached by the recipe. Step time
is the distillation phase's train seconds per optimizer step. Run::

    python benchmarks/relation_recipes.py --seeds 0 1 2
    python benchmarks/relation_recipes.py --recipe text --seeds 0 1 2
    python benchmarks/relation_recipes.py --seeds 0 --max_steps 20 --relations rkd sp     # smoke test
    python benchmarks/relation_recipes.py --recipe text --from_json a.json b.json           # one table of saved runs
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
import text_classification  # noqa: E402
import vit_image_classification  # noqa: E402

from hf_kd.distillers.base import _REGISTRY  # noqa: E402
from hf_kd.recipes import parse_overrides  # noqa: E402

RELATIONS = sorted(n for n, c in _REGISTRY.items() if c.family == "relation" and c.__module__.startswith("hf_kd."))
KL = {"name": "kl", "temperature": 2.0}
RECIPES = {"vit": (vit_image_classification.RECIPE, "ViT digits, test accuracy (%) on the 360 held-out images"),
           "text": (text_classification.RECIPE, "BBC News, test accuracy (%) on the 425 held-out articles")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="vit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--relations", nargs="+", default=RELATIONS, choices=RELATIONS)
    parser.add_argument("--max_steps", type=int, default=-1,
                        help="At most this many steps per phase (-1: the recipe's).")
    parser.add_argument("--weights", type=float, nargs="+", default=[None],
                        help="Run each relation at each of these weights (default: its own default weight).")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Other recipe settings for every run, e.g. teacher=<path> max_length=64.")
    parser.add_argument("--output_dir", default="outputs/relation_recipes")
    parser.add_argument("--json", default=None, help="Also write every run's figures to this JSON file.")
    parser.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                        help="Run nothing: print the table of the runs saved in these --json files together.")
    return parser.parse_args(argv)


def label(distillers: list[dict]) -> str:
    """``kl+rkd``, or ``kl+rkd@0.3`` where a weight is given."""
    return "+".join(d["name"] + (f"@{d['weight']:g}" if "weight" in d else "") for d in distillers)


def run(cli: argparse.Namespace, seed: int, distillers: list[dict], baseline: bool) -> dict:
    name = label(distillers)
    recipe = RECIPES[cli.recipe][0]
    args, training_args = recipe.parse_dict({
        **parse_overrides(cli.set), "seed": seed, "distillers": distillers, "baseline": baseline,
        "max_steps": cli.max_steps, "output_dir": f"{cli.output_dir}/{name}-seed{seed}", "eval_strategy": "no",
        "logging_steps": 100,
    })
    out = recipe.run(args, training_args)
    student = out["results"]["student"]
    steps = max(log.get("step", 0) for log in out["histories"]["distillation"])
    row = {"seed": seed, "distillers": name, "accuracy": student.metrics["accuracy"],
           "step_ms": 1000 * student.train_seconds / steps}
    if baseline:
        row["no_kd_accuracy"] = out["results"]["baseline"].metrics["accuracy"]
    return row


def table(rows: list[dict]) -> str:
    """Accuracy and step time per distiller set; a seed run more than once (e.g. ``kl`` in several invocations)
    counts once, with the mean of its runs."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        runs.setdefault(row["distillers"], {}).setdefault(row["seed"], []).append(row)

    def per_seed(name: str, key: str) -> list[float]:
        return [statistics.mean(r[key] for r in seed_rows) for _, seed_rows in sorted(runs[name].items())]

    kl_ms, kl_acc = statistics.mean(per_seed("kl", "step_ms")), statistics.mean(per_seed("kl", "accuracy"))
    no_kd = per_seed("kl", "no_kd_accuracy")
    lines = ["| distillers | accuracy (mean) | per seed | vs kl | vs no KD | step time vs kl |",
             "|---|---|---|---|---|---|",
             f"| none (CE only) | {100 * statistics.mean(no_kd):.1f} | "
             + ", ".join(f"{100 * a:.1f}" for a in no_kd) + " | | | |"]
    for name in runs:
        accuracy = per_seed(name, "accuracy")
        acc, ms = statistics.mean(accuracy), statistics.mean(per_seed(name, "step_ms"))
        lines.append(f"| {name} | {100 * acc:.1f} | " + ", ".join(f"{100 * a:.1f}" for a in accuracy)
                     + f" | {100 * (acc - kl_acc):+.1f} | {100 * (acc - statistics.mean(no_kd)):+.1f} | "
                     f"{ms / kl_ms:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parse_args(argv)
    if cli.from_json:
        rows = [row for path in cli.from_json for row in json.loads(Path(path).read_text())["rows"]]
        print(f"{RECIPES[cli.recipe][1]}:\n" + table(sorted(rows, key=lambda r: r["distillers"] != "kl")))
        return rows
    start, rows = time.perf_counter(), []
    for seed in cli.seeds:
        rows.append(run(cli, seed, [KL], baseline=True))
        print(json.dumps(rows[-1]), flush=True)
        for relation in cli.relations:
            for weight in cli.weights:
                relation_spec = {"name": relation, **({} if weight is None else {"weight": weight})}
                rows.append(run(cli, seed, [KL, relation_spec], baseline=False))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{RECIPES[cli.recipe][1]}:\n" + table(rows))
    print(f"Wall time {time.perf_counter() - start:.0f} s.")
    if cli.json:
        Path(cli.json).write_text(json.dumps({"args": vars(cli), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # as the recipe: tiny models, shared CPU
    main()

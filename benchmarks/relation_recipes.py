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
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_rows import RECIPES, run_row, table  # noqa: E402

from hf_kd.distillers.base import _REGISTRY  # noqa: E402
from hf_kd.recipes import parse_overrides  # noqa: E402

RELATIONS = sorted(n for n, c in _REGISTRY.items() if c.family == "relation" and c.__module__.startswith("hf_kd."))
KL = {"name": "kl", "temperature": 2.0}


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
    settings = {**parse_overrides(cli.set), "distillers": distillers, "max_steps": cli.max_steps}
    return run_row(cli.recipe, label(distillers), seed, settings, cli.output_dir, baseline)[0]


def main(argv: list[str] | None = None) -> list[dict]:
    cli = parse_args(argv)
    if cli.from_json:
        rows = [row for path in cli.from_json for row in json.loads(Path(path).read_text())["rows"]]
        print(f"{RECIPES[cli.recipe][1]}:\n" + table(rows))
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

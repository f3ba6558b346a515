"""The recipes with ``teacher_cache: auto`` against a live teacher: the student's quality per top-k and the wall time of
the distillation phase.

(a) Causal LM (SmolLM2-135M teacher, the recipe's 2x128 Llama student, BBC News blocks): held-out perplexity of the
    student distilled from caches of k = 8, 32, 64 and from the live teacher, same steps, data and seed.
(b) Wall seconds of the distillation phase, cached vs live, for the causal-LM and text-classification recipes; the
    cache's one-time build is reported apart (it runs the teacher once over the train rows).

Every run has no baseline and no periodic evaluation, one epoch over ``steps x batch`` train rows, and a fresh
``cache_dir`` under ``--output_dir`` (the text teacher's fine-tuning, capped by ``max_steps``, runs once there).
Run::

    python benchmarks/cache_recipes.py --json benchmarks/results/cache_recipes.json     # ~14 min on 2 CPU cores
    python benchmarks/cache_recipes.py --lm_steps 2 --text_steps 2                      # smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import causal_lm  # noqa: E402
import text_classification  # noqa: E402


def run(recipe, settings: dict, label: str, root: Path) -> dict:
    """One recipe run over ``settings``: the student's metrics and the seconds of the cache build and distillation."""
    args, training_args = recipe.parse_dict({"baseline": False, "eval_strategy": "no", "logging_steps": 1000,
                                             "cache_dir": str(root / "cache"), "output_dir": str(root / label),
                                             **settings})
    out = recipe.run(args, training_args)
    return {"label": label, "metrics": out["results"]["student"].metrics,
            "distillation_s": out["seconds"]["distillation"], "build_s": out["seconds"].get("teacher_cache")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm_steps", type=int, default=30)
    parser.add_argument("--text_steps", type=int, default=50)
    parser.add_argument("--top_k", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--output_dir", default=None, help="Default: a temporary folder.")
    parser.add_argument("--json", default=None)
    cli = parser.parse_args()
    torch.set_num_threads(2)  # the teachers' forwards use both cores
    root = Path(cli.output_dir or tempfile.mkdtemp(prefix="cache_recipes-"))

    # (a) + (b) causal LM: the live teacher, then one cache per k (each built once, its build timed apart)
    lm = {"max_steps": cli.lm_steps, "max_train_samples": 8 * cli.lm_steps, "max_eval_samples": 64, "seed": 0}
    rows = [run(causal_lm.RECIPE, lm, "lm-live", root)]
    rows += [run(causal_lm.RECIPE, {**lm, "teacher_cache": "auto", "teacher_cache_top_k": k}, f"lm-k{k}", root)
             for k in cli.top_k]
    live = rows[0]["metrics"]["perplexity"]
    print(f"\ncausal LM, {cli.lm_steps} steps of 8 x 128 tokens, held-out perplexity (64 blocks):")
    print("| teacher | perplexity | vs live | distillation s | cache build s |\n|---|---|---|---|---|")
    for row in rows:
        ppl = row["metrics"]["perplexity"]
        build = "" if row["build_s"] is None else f"{row['build_s']:.0f}"
        print(f"| {row['label'][3:]} | {ppl:.1f} | {100 * (ppl / live - 1):+.1f}% | {row['distillation_s']:.0f} | "
              f"{build} |")

    # (b) text classification: live vs cached (classifier caches hold the full logits; top_k does not apply)
    text = {"max_steps": cli.text_steps, "max_train_samples": 16 * cli.text_steps, "seed": 0}
    text_rows = [run(text_classification.RECIPE, text, "text-live", root),
                 run(text_classification.RECIPE, {**text, "teacher_cache": "auto"}, "text-cached", root)]
    print(f"\ntext classification, {cli.text_steps} steps of 16 x 128 tokens:")
    print("| teacher | accuracy | distillation s | cache build s |\n|---|---|---|---|")
    for row in text_rows:
        build = "" if row["build_s"] is None else f"{row['build_s']:.0f}"
        print(f"| {row['label'][5:]} | {100 * row['metrics']['accuracy']:.1f}% | {row['distillation_s']:.0f} | "
              f"{build} |")
    for name, pair in (("causal LM (k=64)", (rows[0], rows[-1])), ("text classification", tuple(text_rows))):
        print(f"{name}: distillation phase {pair[0]['distillation_s'] / pair[1]['distillation_s']:.2f}x faster "
              "cached")
    if cli.json:
        Path(cli.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cli.json).write_text(json.dumps({"causal_lm": rows, "text_classification": text_rows}, indent=2))


if __name__ == "__main__":
    main()

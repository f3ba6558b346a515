"""The ``hf-kd`` console script: run a recipe from its YAML config, show the config a run would use, or build the
teacher cache a ``teacher_cache=auto`` run reads.

    hf-kd run recipes/vit_image_classification.yaml max_steps=5 "distillers=[{name: kl, temperature: 2}]"
    hf-kd show recipes/vit_image_classification.yaml seed=1
    hf-kd cache recipes/causal_lm.yaml teacher_cache_top_k=32   # prints the folder; then run ... teacher_cache=auto
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .recipes.config import dump_config, load_config, load_recipe


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-kd",
        description="Run hf_kd recipes from YAML configs. A config's keys are the recipe's settings and any "
        "DistillationArguments/TrainingArguments field; `key=value` overrides are read as YAML values.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "Run the recipe of CONFIG with the overrides applied."),
                            ("show", "Print the fully resolved config of a run as YAML, without running it."),
                            ("cache", "Build the teacher cache of CONFIG's teacher and train data (the folder in "
                             "cache_dir that `teacher_cache=auto` reads; the teacher prepared as the run does) and "
                             "print its path, without training the students.")):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("config", type=Path,
                             help="A recipe's YAML config, e.g. recipes/vit_image_classification.yaml.")
        command.add_argument("overrides", nargs="*", metavar="key=value",
                             help="Settings over the config's, e.g. max_steps=5 seed=1 "
                             "\"distillers=[{name: kl, temperature: 2}]\".")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    cli = parser.parse_args(argv)
    try:
        recipe = load_recipe(cli.config)
        config = load_config(cli.config, cli.overrides)
        if cli.command == "cache":
            config = {**config, "teacher_cache": "auto", "teacher_cache_only": True}
        args, training_args = recipe.parse_dict(config)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if cli.command == "show":
        print(dump_config(recipe.to_dict(args, training_args)), end="")
        return 0
    output = recipe.run(args, training_args)
    if cli.command == "cache":
        print(f"teacher cache: {output['teacher_cache']}")
        return 0
    results = Path(training_args.output_dir) / "results.json"
    print(f"results: {results}" if results.is_file() else f"the recipe wrote no results.json in {results.parent}")
    return 0

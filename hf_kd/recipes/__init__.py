"""Shared machinery of the recipes in ``recipes/``: configuration, the one run they share, and its pieces.

A recipe script imports what it uses from here: ``Recipe`` / ``RecipeArguments`` (its settings; ``Recipe.for_script``
reads their defaults from the YAML beside the script), ``run_recipe`` / ``Teacher`` / ``PhaseTimer`` (the run:
teacher evaluation, baseline, distillation, reports), and helpers for its data and teacher (``load_splits``,
``Classes``, ``train_teacher``, ...).
"""

from .card import write_model_card
from .classification import Classes, classification_metrics
from .config import Recipe, RecipeArguments, dump_config, load_config, load_recipe, parse_overrides
from .data import bbc_news_articles, load_splits, package_dir, require_columns
from .phases import attention_options, cached_model, evaluate_model, phase_arguments, train_model
from .report import (
    ModelResult,
    count_parameters,
    measure_latency,
    plot_history,
    results_table,
    saved_size,
    size_on_disk,
    write_results,
)
from .run import CacheOutput, RunOutput, run_recipe
from .teacher import Teacher, train_teacher
from .timer import PhaseTimer

__all__ = [
    "CacheOutput",
    "Classes",
    "ModelResult",
    "PhaseTimer",
    "Recipe",
    "RecipeArguments",
    "RunOutput",
    "Teacher",
    "attention_options",
    "bbc_news_articles",
    "cached_model",
    "classification_metrics",
    "count_parameters",
    "dump_config",
    "evaluate_model",
    "load_config",
    "load_recipe",
    "load_splits",
    "measure_latency",
    "package_dir",
    "parse_overrides",
    "phase_arguments",
    "plot_history",
    "require_columns",
    "results_table",
    "run_recipe",
    "saved_size",
    "size_on_disk",
    "train_model",
    "train_teacher",
    "write_model_card",
    "write_results",
]

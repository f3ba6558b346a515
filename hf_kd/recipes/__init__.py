"""Shared machinery of the recipes in ``recipes/``: configuration, the shared run, phases, reports and model cards.

A recipe script imports what it uses from here: ``Recipe`` / ``RecipeArguments`` (its settings, defaults from the
YAML beside it), ``run_recipe`` / ``Teacher`` / ``PhaseTimer`` (the run), and the helpers that load its data and build
its teacher (``load_splits``, ``cached_model``, ``train_plain``, ...).
"""

from .card import write_model_card
from .classification import class_ids, classification_metrics, has_labels, label_config, label_names
from .config import Recipe, RecipeArguments, dump_config, load_config, load_recipe, parse_overrides
from .data import bbc_news_articles, load_splits, package_dir, require_columns
from .phases import cached_model, distil, evaluate_model, phase_arguments, train_plain
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
from .run import RunOutput, run_recipe
from .teacher import Teacher, train_teacher
from .timer import PhaseTimer

__all__ = [
    "ModelResult",
    "PhaseTimer",
    "Recipe",
    "RecipeArguments",
    "RunOutput",
    "Teacher",
    "bbc_news_articles",
    "cached_model",
    "class_ids",
    "classification_metrics",
    "count_parameters",
    "distil",
    "dump_config",
    "evaluate_model",
    "has_labels",
    "label_config",
    "label_names",
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
    "train_plain",
    "train_teacher",
    "write_model_card",
    "write_results",
]

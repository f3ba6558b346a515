"""Shared machinery of the recipes in ``recipes/``: configuration, training phases, reports and model cards."""

from .card import write_model_card
from .config import Recipe, RecipeArguments, dump_config, load_config, load_recipe, parse_overrides
from .classification import classification_metrics, has_labels, label_config, label_names
from .data import load_splits, package_dir, require_columns
from .phases import cached_model, distil, evaluate_model, phase_arguments, train_plain
from .report import (
    ModelResult,
    count_parameters,
    measure_latency,
    plot_history,
    results_table,
    size_on_disk,
    write_results,
)

__all__ = [
    "ModelResult",
    "Recipe",
    "RecipeArguments",
    "cached_model",
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
    "size_on_disk",
    "train_plain",
    "write_model_card",
    "write_results",
]

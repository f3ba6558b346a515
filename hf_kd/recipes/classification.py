"""What the classification recipes share: the task's classes (names, ids, the config keywords that set them) and
metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, Value
from transformers import EvalPrediction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Classes:
    """A classification task's classes in id order, as the train split has them: the keywords that give a model
    these classes, whether a model already has them, and the class ids of a split's labels."""

    names: list[str]
    regression: bool = False  # a float label column (GLUE stsb): one output, MSE; `names` is empty

    @classmethod
    def of(cls, dataset: Dataset, column: str) -> Classes:
        """The classes of ``column``: a ``ClassLabel``'s names, else its sorted distinct values as strings; a float
        column is a regression target."""
        feature = dataset.features[column]
        if isinstance(feature, ClassLabel):
            return cls(list(feature.names))
        if isinstance(feature, Value) and feature.dtype.startswith("float"):
            return cls([], regression=True)
        return cls([str(value) for value in sorted(set(dataset[column]))])

    @property
    def config(self) -> dict[str, Any]:
        """The config / ``from_pretrained`` keywords that give a classifier these classes (a regression: one
        output, ``problem_type="regression"``, so the model's loss is MSE)."""
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {name: i for i, name in enumerate(self.names)}}

    def match(self, config: Any) -> bool:
        """Whether a model with ``config`` already classifies into exactly these classes, in this order."""
        if self.regression:
            return config.num_labels == 1 and config.problem_type == "regression"
        return [config.id2label.get(i) for i in range(config.num_labels)] == self.names

    def ids(self, dataset: Dataset, column: str, split: str) -> list[int] | list[float]:
        """The class id of every example's ``column``: a ``ClassLabel``'s ids as they are, other values by their
        string; an error names the values that are not among these classes. A regression's values as floats."""
        if self.regression:
            return [float(v) for v in dataset[column]]
        ids = {name: i for i, name in enumerate(self.names)}
        raw = dataset[column]
        values = raw if isinstance(dataset.features[column], ClassLabel) else [ids.get(str(v), -1) for v in raw]
        unknown = sorted({str(v) for v, i in zip(raw, values) if not 0 <= i < len(self.names)})
        if unknown:
            raise ValueError(f"The {split} split has labels {unknown[:5]} (`label_column`={column!r}) that are not "
                             f"among the train classes {self.names}; pick another `eval_split` (GLUE test labels are "
                             "hidden, -1) or fix the data.")
        return list(values)


# A metric's evaluate module and the key of its result; the built-in computation gives the same number.
EVALUATE_MODULES = {"accuracy": ("accuracy", "accuracy"), "f1": ("f1", "f1"), "macro_f1": ("f1", "f1"),
                    "matthews_correlation": ("matthews_correlation", "matthews_correlation"),
                    "pearson": ("pearsonr", "pearsonr"), "spearmanr": ("spearmanr", "spearmanr"), "mse": ("mse", "mse")}
METRIC_OPTIONS = {"macro_f1": {"average": "macro"}}
GLUE_METRICS = {"cola": ("matthews_correlation",), "stsb": ("pearson", "spearmanr"), "mrpc": ("accuracy", "f1"),
                "qqp": ("accuracy", "f1")}
REGRESSION_METRICS = ("pearson", "spearmanr", "mse")


def task_metrics(task: str | None, classes: Classes) -> tuple[str, ...]:
    """The metrics reported for a task: GLUE's by ``task`` name (cola: Matthews correlation; stsb: Pearson and
    Spearman; mrpc, qqp: accuracy and F1), else Pearson, Spearman and MSE for regression, accuracy and F1 (binary)
    or macro F1 otherwise."""
    if task in GLUE_METRICS:
        return GLUE_METRICS[task]
    if classes.regression:
        return REGRESSION_METRICS
    return ("accuracy", "f1" if len(classes.names) == 2 else "macro_f1")


def builtin_metric(name: str, predicted: np.ndarray, labels: np.ndarray) -> float:
    """``name`` computed with numpy / scikit-learn / scipy, as evaluate's module of that metric computes it."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef, mean_squared_error

    if name == "accuracy":
        return float((predicted == labels).mean())
    if name in ("f1", "macro_f1"):
        return float(f1_score(labels, predicted, average="macro" if name == "macro_f1" else "binary",
                              zero_division=0))
    if name == "matthews_correlation":
        return float(matthews_corrcoef(labels, predicted))
    if name == "pearson":
        return float(pearsonr(predicted, labels)[0])
    if name == "spearmanr":
        return float(spearmanr(predicted, labels)[0])
    if name == "mse":
        return float(mean_squared_error(labels, predicted))
    raise ValueError(f"Unknown metric {name!r}; pick among {', '.join(EVALUATE_MODULES)}.")


class Metrics:
    """``compute_metrics`` for a classification or regression task: ``names`` (None: accuracy, plus F1 of class 1
    for binary tasks, as GLUE reports it, or macro F1 otherwise).

    Each metric is computed by its ``evaluate`` module (``evaluate.load``: from ``metric_path/<module>`` when
    ``metric_path`` is a folder of metric scripts, else from the Hub or evaluate's cache); a module that cannot be
    loaded (offline, nothing cached) falls back to :func:`builtin_metric`, the same number, with one logged notice
    naming the metrics and why. Modules are loaded on the first call. ``regression``: the predictions are the
    single logit, else the argmax class.
    """

    def __init__(self, names: tuple[str, ...] | list[str] | None = None, *, regression: bool = False,
                 metric_path: str | None = None) -> None:
        unknown = [n for n in names or () if n not in EVALUATE_MODULES]
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}; pick among {', '.join(EVALUATE_MODULES)}.")
        self.names, self.regression, self.metric_path = tuple(names) if names else None, regression, metric_path
        self.modules: dict[str, Any] = {}  # name: the loaded evaluate module, or None (built in)

    def load(self, names: tuple[str, ...]) -> None:
        """Load the evaluate modules of ``names`` not loaded yet; one notice for those that fall back."""
        failed = {}
        for name in names:
            if name in self.modules:
                continue
            module = EVALUATE_MODULES[name][0]
            source = str(Path(self.metric_path) / module) if self.metric_path else module
            try:
                import evaluate

                self.modules[name] = evaluate.load(source)
            except (OSError, ImportError, ValueError) as error:  # offline: FileNotFoundError / ConnectionError
                self.modules[name] = None
                failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if failed:
            reasons = "; ".join(dict.fromkeys(failed.values()))
            logger.warning(f"evaluate metrics {', '.join(failed)} not loadable ({reasons}); using hf_kd's built-in "
                           "computation (the same numbers).")

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        logits, labels = np.asarray(logits), np.asarray(prediction.label_ids)
        if self.regression:
            predicted, labels = logits.reshape(len(logits), -1)[:, 0].astype(np.float64), labels.astype(np.float64)
        else:
            predicted = logits.argmax(-1)
        names = self.names or ("accuracy", "f1" if logits.shape[-1] == 2 else "macro_f1")
        self.load(names)
        scores = {}
        for name in names:
            module = self.modules[name]
            if module is None:
                scores[name] = builtin_metric(name, predicted, labels)
            else:
                result = module.compute(predictions=predicted, references=labels, **METRIC_OPTIONS.get(name, {}))
                scores[name] = float(result[EVALUATE_MODULES[name][1]])
        return scores


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy, plus F1 of class 1 for binary tasks (as GLUE reports it) or macro F1 otherwise: evaluate's modules
    when they load, else the built-in computation (:class:`Metrics`)."""
    return _DEFAULT(prediction)


_DEFAULT = Metrics()

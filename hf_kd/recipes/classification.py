"""What the classification recipes share: class names and ids, the config keywords that set them, and metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset
from transformers import EvalPrediction


def label_names(dataset: Dataset, column: str) -> list[str]:
    """The class names of ``column``: a ``ClassLabel``'s names, else its sorted distinct values as strings."""
    feature = dataset.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(dataset[column]))]


def label_config(names: list[str]) -> dict[str, Any]:
    """The config / ``from_pretrained`` keywords that give a classifier the classes ``names``."""
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)}}


def class_ids(dataset: Dataset, column: str, names: list[str], split: str) -> list[int]:
    """The class id (index in ``names``) of every example's ``column``: a ``ClassLabel``'s ids as they are, other
    values by their string; an error names the values that are not among ``names`` (the train split's classes)."""
    ids = {name: i for i, name in enumerate(names)}
    raw = dataset[column]
    values = raw if isinstance(dataset.features[column], ClassLabel) else [ids.get(str(v), -1) for v in raw]
    unknown = sorted({str(v) for v, i in zip(raw, values) if not 0 <= i < len(names)})
    if unknown:
        raise ValueError(f"The {split} split has labels {unknown[:5]} (`label_column`={column!r}) that are not among "
                         f"the train classes {names}; pick another `eval_split` (GLUE test labels are hidden, -1) or "
                         "fix the data.")
    return list(values)


def has_labels(config: Any, names: list[str]) -> bool:
    """Whether a model with ``config`` already classifies into exactly ``names``, in that order."""
    return [config.id2label.get(i) for i in range(config.num_labels)] == names


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy, plus F1 of class 1 for binary tasks (as GLUE reports it) or macro F1 otherwise.

    Computed here with numpy / scikit-learn: ``evaluate.load("accuracy")`` fetches its script from the Hub, which
    fails offline.
    """
    from sklearn.metrics import f1_score

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, labels = np.asarray(logits).argmax(-1), np.asarray(prediction.label_ids)
    binary = np.asarray(logits).shape[-1] == 2
    f1 = f1_score(labels, predicted, average="binary" if binary else "macro", zero_division=0)
    return {"accuracy": float((predicted == labels).mean()), "f1" if binary else "macro_f1": float(f1)}

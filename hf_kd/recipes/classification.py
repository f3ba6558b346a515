"""What the classification recipes share: class names, the config keywords that set them, and metrics."""

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

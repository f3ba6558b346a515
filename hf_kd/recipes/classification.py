"""What the classification recipes share: the task's classes (names, ids, the config keywords that set them) and
metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset
from transformers import EvalPrediction


@dataclass(frozen=True)
class Classes:
    """A classification task's classes in id order, as the train split has them: the keywords that give a model
    these classes, whether a model already has them, and the class ids of a split's labels."""

    names: list[str]

    @classmethod
    def of(cls, dataset: Dataset, column: str) -> Classes:
        """The classes of ``column``: a ``ClassLabel``'s names, else its sorted distinct values as strings."""
        feature = dataset.features[column]
        if isinstance(feature, ClassLabel):
            return cls(list(feature.names))
        return cls([str(value) for value in sorted(set(dataset[column]))])

    @property
    def config(self) -> dict[str, Any]:
        """The config / ``from_pretrained`` keywords that give a classifier these classes."""
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)),
                "label2id": {name: i for i, name in enumerate(self.names)}}

    def match(self, config: Any) -> bool:
        """Whether a model with ``config`` already classifies into exactly these classes, in this order."""
        return [config.id2label.get(i) for i in range(config.num_labels)] == self.names

    def ids(self, dataset: Dataset, column: str, split: str) -> list[int]:
        """The class id of every example's ``column``: a ``ClassLabel``'s ids as they are, other values by their
        string; an error names the values that are not among these classes."""
        ids = {name: i for i, name in enumerate(self.names)}
        raw = dataset[column]
        values = raw if isinstance(dataset.features[column], ClassLabel) else [ids.get(str(v), -1) for v in raw]
        unknown = sorted({str(v) for v, i in zip(raw, values) if not 0 <= i < len(self.names)})
        if unknown:
            raise ValueError(f"The {split} split has labels {unknown[:5]} (`label_column`={column!r}) that are not "
                             f"among the train classes {self.names}; pick another `eval_split` (GLUE test labels are "
                             "hidden, -1) or fix the data.")
        return list(values)


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

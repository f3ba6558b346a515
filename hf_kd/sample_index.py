"""Each training sample's position in the train dataset, for distillers that keep per-sample state (e.g. CRD's memory
bank), without changing the user's dataset.

When a distiller declares ``needs_sample_index``, the trainer gives the train dataset a column
:data:`~hf_kd.architecture.SAMPLE_INDEX` (``0 .. len - 1``): a ``datasets.Dataset`` gets it with ``add_column`` (a new
dataset object; the user's stays as it was), any other map-style dataset is wrapped so that each item is a dict with
the index added. The index is a column, so it follows the sampler: shuffling, several epochs and resumed runs all
read the index of the sample actually in the batch. Trainer's column removal keeps it (the trainer adds it to the
signature columns), the default collators turn it into a ``[B]`` int64 tensor, and the models never receive it (it is
one of ``NOT_MODEL_INPUTS``); distillers read it as ``batch[SAMPLE_INDEX]``. Evaluation datasets get no index.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from .architecture import SAMPLE_INDEX


class IndexedDataset(Dataset):
    """A map-style dataset whose items (dicts) carry their position as :data:`SAMPLE_INDEX`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"A distiller needs each sample's index, so the train dataset's items must be dicts of "
                            f"columns; item {index} is a {type(item).__name__}.")
        return {**item, SAMPLE_INDEX: index}


def with_sample_index(dataset: Any, readers: Sequence[str]) -> Any:
    """``dataset`` with a :data:`SAMPLE_INDEX` column; ``readers`` name the distillers that need it (for errors)."""
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"Distillers {list(readers)} keep state per training sample, so they need a map-style "
                         f"`train_dataset` with a length (a datasets.Dataset or a torch Dataset with __len__); got "
                         f"{type(dataset).__name__}.")
    if hasattr(dataset, "column_names") and hasattr(dataset, "add_column"):  # datasets.Dataset
        if SAMPLE_INDEX in dataset.column_names:
            raise ValueError(f"The train dataset already has a column {SAMPLE_INDEX!r}, which hf_kd adds; rename it.")
        return dataset.add_column(SAMPLE_INDEX, list(range(len(dataset))))
    return IndexedDataset(dataset)

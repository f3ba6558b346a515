"""The shared recipe machinery: configs and overrides, the ``hf-kd`` CLI, phases, reports and model cards."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from hf_kd import DistillationArguments
from hf_kd.cli import main as cli_main
from hf_kd.recipes import (
    ModelResult,
    Recipe,
    RecipeArguments,
    cached_model,
    count_parameters,
    dump_config,
    load_config,
    load_recipe,
    measure_latency,
    parse_overrides,
    phase_arguments,
    plot_history,
    size_on_disk,
    write_model_card,
    write_results,
)

SCRIPT = '''
"""A toy recipe: its run records and returns its inputs."""

from dataclasses import dataclass, field

from hf_kd.recipes import Recipe, RecipeArguments

CALLS = []


@dataclass
class ToyArguments(RecipeArguments):
    hidden_size: int = field(default=8, metadata={"help": "Width of the toy student."})


def run(args, training_args):
    CALLS.append((args, training_args))
    return {"args": args, "training_args": training_args}


RECIPE = Recipe(
    name="toy",
    arguments=ToyArguments,
    run=run,
    defaults={"output_dir": "OUTPUT", "learning_rate": 1e-3, "report_to": [],
              "distillers": [{"name": "kl", "temperature": 2.0}]},
)
'''


@pytest.fixture
def toy(tmp_path: Path) -> tuple[Recipe, Path]:
    """The toy recipe's script and YAML in ``tmp_path``, loaded with ``load_recipe``."""
    (tmp_path / "toy.py").write_text(SCRIPT.replace("OUTPUT", str(tmp_path / "out")))
    config = tmp_path / "toy.yaml"
    config.write_text("hidden_size: 16\nmax_steps: 3\nlr_scheduler_type: cosine\nwarmup_steps: 5e-2\n")
    return load_recipe(config), config


def test_parse_overrides_reads_yaml_values():
    overrides = parse_overrides(["max_steps=5", "learning_rate=3e-4", "weight_decay=.5", "baseline=false",
                                 "report_to=[]",
                                 "distillers=[{name: kl, temperature: 2}]", "progressive_layers={mode: progressive}",
                                 "task=sst2"])
    assert overrides == {"max_steps": 5, "learning_rate": 3e-4, "weight_decay": 0.5, "baseline": False, "report_to": [],
                         "distillers": [{"name": "kl", "temperature": 2}],
                         "progressive_layers": {"mode": "progressive"}, "task": "sst2"}


@pytest.mark.parametrize("item, message", [("max_steps", "not `key=value`"), ("=5", "not `key=value`"),
                                           ("distillers.0.name=kl", "nested keys are not supported")])
def test_parse_overrides_errors(item, message):
    with pytest.raises(ValueError, match=message):
        parse_overrides([item])


def test_load_recipe_and_parse_dict(toy):
    recipe, config_path = toy
    assert recipe.name == "toy"
    config = load_config(config_path, ["distillers=[{name: mse}]", "teacher=some/teacher"])
    args, training_args = recipe.parse_dict(config)
    assert (args.hidden_size, args.teacher, args.baseline, args.cache_dir) == (
        16, "some/teacher", True, "~/.cache/hf_kd")
    assert isinstance(training_args, DistillationArguments)
    assert (training_args.max_steps, training_args.learning_rate, training_args.warmup_steps) == (3, 1e-3, 0.05)
    assert training_args.distillers == [{"name": "mse"}]
    assert training_args.output_dir.endswith("out")


def test_a_list_of_teachers_is_the_teacher_and_its_assistants(toy):
    recipe, config_path = toy
    args, _ = recipe.parse_dict(load_config(config_path, ["teacher=[t/a, t/b, t/c]", "assistants=[t/d]"]))
    assert (args.teacher, args.assistants) == ("t/a", ["t/b", "t/c", "t/d"])
    args, _ = recipe.parse_dict(load_config(config_path, ["teacher=[t/a]"]))
    assert (args.teacher, args.assistants) == ("t/a", [])


def test_unknown_keys_are_named_with_suggestions(toy):
    recipe, _ = toy
    with pytest.raises(ValueError) as error:
        recipe.parse_dict({"hiden_size": 4, "learning_rat": 1e-3})
    message = str(error.value)
    assert "'hiden_size' (did you mean hidden_size" in message
    assert "'learning_rat' (did you mean learning_rate" in message
    assert "--help" in message and "teacher_epochs" in message


def test_recipe_rejects_clashing_fields_and_unknown_training_defaults(toy):
    recipe, _ = toy
    with pytest.raises(ValueError, match=r"\['hiden'\] are not DistillationArguments fields"):
        Recipe(name="bad", arguments=recipe.arguments, run=recipe.run, defaults={"hiden": 1})


def test_yaml_round_trip(toy):
    recipe, config_path = toy
    args, training_args = recipe.parse_dict(load_config(config_path, ["seed=3", "baseline=false"]))
    config = recipe.to_dict(args, training_args)
    assert config["lr_scheduler_type"] == "cosine" and config["seed"] == 3 and config["baseline"] is False
    assert config["distillers"] == [{"name": "kl", "temperature": 2.0}] and config["report_to"] == []
    assert "per_device_eval_batch_size" not in config  # untouched defaults stay out
    again = recipe.parse_dict(config)
    assert again == (args, training_args)
    assert yaml.safe_load(dump_config(config)) == config
    assert list(yaml.safe_load(dump_config(config))) == list(config)


@pytest.mark.parametrize("name", ["text_classification", "causal_lm", "vit_image_classification"])
def test_every_shipped_recipe_config_round_trips(name):
    """recipes/<name>.yaml -> dataclasses -> YAML -> the same dataclasses, and the YAML equals the script's defaults."""
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)
    parsed = recipe.parse_dict(load_config(path))
    dumped = dump_config(recipe.to_dict(*parsed))
    assert recipe.parse_dict(yaml.safe_load(dumped)) == parsed
    assert recipe.parse_argv([]) == parsed


@pytest.mark.parametrize("name", ["text_classification", "causal_lm", "vit_image_classification"])
def test_shipped_recipe_defaults_live_only_in_its_yaml(name):
    """A shipped recipe's settings are written once, in its YAML: the fields its dataclass adds (or redeclares) carry
    types and help and no defaults, ``Recipe.for_script`` reads the YAML, so the script's flags, ``hf-kd run`` and
    Python start from the same values, and ``--help`` shows them beside the help texts."""
    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.yaml"
    recipe, config = load_recipe(path), load_config(path)
    assert recipe.name == name and list(recipe.defaults) == list(config)
    assert recipe.parse_argv([]) == recipe.parse_dict({}) == recipe.parse_dict(config)
    shared = {f.name: f.default for f in dataclasses.fields(RecipeArguments)}
    own = [f for f in dataclasses.fields(recipe.arguments) if f.name not in shared or f.default != shared[f.name]]
    assert own and all(f.default is f.default_factory is dataclasses.MISSING for f in own)
    assert {f.name for f in dataclasses.fields(recipe.arguments)} <= set(config)  # every setting spelled out
    usage = " ".join(recipe.parser().format_help().split())
    for f in own:
        assert f"{' '.join(f.metadata['help'].split())} (default: {config[f.name]})" in usage


@dataclass(kw_only=True)
class WidthArguments(RecipeArguments):
    width: int = field(metadata={"help": "Width of the model."})


def test_recipe_needs_a_value_for_every_setting_without_a_default(toy):
    recipe, _ = toy
    with pytest.raises(ValueError, match=r"settings \['width'\] have no value; set them in the recipe's YAML"):
        Recipe(name="bad", arguments=WidthArguments, run=recipe.run, defaults={"output_dir": "x"})
    good = Recipe(name="good", arguments=WidthArguments, run=recipe.run, defaults={"width": "3", "output_dir": "x"})
    assert good.defaults == {"width": 3, "output_dir": "x"}  # converted to the fields' types
    assert good.parse_argv([]) == good.parse_dict({}) and good.parse_argv([])[0].width == 3
    assert good.parse_argv(["--width", "5"])[0].width == 5


def test_argv_agrees_with_dict(toy):
    recipe, _ = toy
    from_argv = recipe.parse_argv(["--hidden_size", "4", "--max_steps", "7", "--no_baseline",
                                   "--distillers", '[{"name": "kl", "temperature": 4}]'])
    from_dict = recipe.parse_dict({"hidden_size": 4, "max_steps": 7, "baseline": False,
                                   "distillers": [{"name": "kl", "temperature": 4}]})
    assert from_argv == from_dict
    assert recipe.parse_argv([]) == recipe.parse_dict({})


def test_main_runs_with_argv(toy):
    recipe, _ = toy
    result = recipe.main(["--hidden_size", "5"])
    assert result["args"].hidden_size == 5 and result["training_args"].learning_rate == 1e-3


def test_cli_run_calls_the_recipe_with_overrides(toy, capsys):
    recipe, config_path = toy
    assert cli_main(["run", str(config_path), "hidden_size=32", "learning_rate=1e-2"]) == 0
    args, training_args = sys.modules[recipe.run.__module__].CALLS[-1]  # the script as `hf-kd` loaded it
    assert (args.hidden_size, training_args.learning_rate, training_args.max_steps) == (32, 0.01, 3)
    assert "no results.json in" in capsys.readouterr().out


def test_cli_show_prints_the_round_tripped_yaml(toy, capsys):
    recipe, config_path = toy
    assert cli_main(["show", str(config_path), "seed=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == recipe.to_dict(*recipe.parse_dict(load_config(config_path, ["seed=9"])))
    assert (shown["hidden_size"], shown["seed"], shown["max_steps"]) == (16, 9, 3)


def test_cli_errors_name_the_problem(toy, tmp_path, capsys):
    _, config_path = toy
    with pytest.raises(SystemExit):
        cli_main(["show", str(config_path), "hiden_size=3"])
    assert "did you mean hidden_size" in capsys.readouterr().err
    orphan = tmp_path / "orphan.yaml"
    orphan.write_text("seed: 1\n")
    with pytest.raises(SystemExit):
        cli_main(["run", str(orphan)])
    assert "orphan.py" in capsys.readouterr().err


def test_load_recipe_follows_the_recipe_key_and_requires_RECIPE(toy, tmp_path):
    other = tmp_path / "configs" / "other.yaml"
    other.parent.mkdir()
    other.write_text("recipe: ../toy.py\nseed: 2\n")
    assert load_recipe(other).name == "toy"
    assert load_config(other) == {"seed": 2}
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "empty.yaml").write_text("seed: 1\n")
    with pytest.raises(ValueError, match="must define a module-level `RECIPE"):
        load_recipe(tmp_path / "empty.yaml")


def test_phase_arguments_caps_every_phase(tmp_path):
    base = DistillationArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=10,
                                 report_to=[])
    teacher = phase_arguments(base, output_dir=tmp_path / "teacher", epochs=3.0, learning_rate=1e-4)
    assert (teacher.output_dir, teacher.num_train_epochs, teacher.learning_rate, teacher.max_steps) == (
        str(tmp_path / "teacher"), 3.0, 1e-4, 5)
    assert phase_arguments(base, output_dir=tmp_path, epochs=1.0, train_size=25).max_steps == 3  # 1 epoch: 3 steps
    assert phase_arguments(base, output_dir=tmp_path, epochs=9.0, train_size=25).max_steps == 5
    uncapped = phase_arguments(base.__class__(output_dir=str(tmp_path), report_to=[]), output_dir=tmp_path,
                               train_size=25)
    assert uncapped.max_steps == -1
    assert base.max_steps == 5 and base.output_dir == str(tmp_path)  # a copy


def test_cached_model_builds_once(tmp_path, capsys):
    builds = []

    def build(folder: Path) -> None:
        builds.append(folder)
        (folder / "config.json").write_text("{}")

    first = cached_model(tmp_path / "cache", "teacher-a", build)
    second = cached_model(tmp_path / "cache", "teacher-a", build)
    assert first == second == tmp_path / "cache" / "teacher-a" and len(builds) == 1
    assert (first / "config.json").read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["teacher-a"]  # no staging left
    out = capsys.readouterr().out
    assert f"cached teacher-a at {first}" in out and f"reusing cached teacher-a at {first}" in out


def test_cached_model_leaves_no_half_cache(tmp_path):
    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_model(tmp_path, "teacher-b", broken)
    assert list(tmp_path.iterdir()) == []


RESULTS = {
    "teacher": ModelResult("teacher", 136138, 2_000_000, 3.5, {"accuracy": 0.967}, 40.0),
    "student": ModelResult("student (KD)", 9674, 500_000, 0.75, {"accuracy": 0.953, "loss": 0.21}, 12.5,
                           retention={"accuracy": 0.953 / 0.967}),
}


def test_write_results(tmp_path):
    json_path, md_path = write_results(tmp_path / "run", RESULTS, notes=["KD is ahead."])
    data = json.loads(json_path.read_text())
    assert list(data) == ["teacher", "student"]
    assert data["student"] == {"name": "student (KD)", "params": 9674, "size_on_disk_bytes": 500000,
                               "latency_ms": 0.75, "latency_spread_ms": None,
                               "metrics": {"accuracy": 0.953, "loss": 0.21}, "train_seconds": 12.5,
                               "retention": {"accuracy": 0.953 / 0.967}}
    assert "retention" not in data["teacher"]  # a teacher has none
    lines = md_path.read_text().splitlines()
    assert lines[0] == "| model | params | size (MB) | latency (ms) | accuracy | loss |"
    assert "| teacher | 136,138 | 2.00 | 3.50 | 0.967 | – |" in lines
    assert "| student (KD) | 9,674 | 0.50 | 0.75 | 0.953 | 0.21 |" in lines
    assert lines[-1] == "KD is ahead."


def test_plot_history(tmp_path):
    history = [{"loss": 2.0, "loss/kl": 1.0, "step": 10}, {"eval_accuracy": 0.5, "step": 10},
               {"loss": 1.0, "loss/kl": 0.5, "step": 20}, {"eval_accuracy": 0.8, "step": 20},
               {"train_loss": 1.5, "step": 20}]
    path = plot_history({"teacher": history[::2], "distil": history}, tmp_path / "plots" / "history.png",
                        "accuracy")
    assert path == tmp_path / "plots" / "history.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_model_size_and_speed(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    assert count_parameters(model) == 4 * 8 + 8 + 8 * 2 + 2

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inputs):
            return self.net(inputs)

    wrapped = Wrapped().train()
    latency = measure_latency(wrapped, {"inputs": torch.randn(3, 4)}, repeats=5, warmup=1)
    assert isinstance(latency, float) and latency > 0 and wrapped.training
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "b.safetensors").write_bytes(b"x" * 24)
    (tmp_path / "config.json").write_text("{}")
    assert size_on_disk(tmp_path) == 1024  # the weight files
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "shard" / "b.safetensors").unlink()
    (tmp_path / "notes.txt").write_bytes(b"y" * 10)
    assert size_on_disk(tmp_path) == 12  # no weights: every file
    assert size_on_disk(tmp_path / "notes.txt") == 10


def test_write_model_card(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"]}))
    path = write_model_card(tmp_path, recipe="vit_digits", teacher="teacher/vit", dataset="digits",
                            distillers=[{"name": "kl", "temperature": 2.0}], results=RESULTS,
                            base_model="google/vit-base")
    text = path.read_text()
    assert path == tmp_path / "README.md" and text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["tags"] == ["hf-kd", "knowledge-distillation", "vit_digits"]
    assert (front["library_name"], front["datasets"], front["base_model"]) == ("transformers", ["digits"],
                                                                               "google/vit-base")
    assert front["metrics"] == ["accuracy", "loss"]
    assert "AutoModelForImageClassification.from_pretrained" in text
    assert "| student (KD) | 9,674 |" in text and '[{"name": "kl", "temperature": 2.0}]' in text
    assert "hf-kd run recipes/vit_digits.yaml" in text


# ---- every setting checked when the config is parsed, before any work ------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    ("max_steps=abc", r"Setting `max_steps` must be int, got 'abc' \(str\)"),
    ("learning_rate=fast", r"Setting `learning_rate` must be float, got 'fast' \(str\)"),
    ("hidden_size=two", r"Setting `hidden_size` must be int, got 'two' \(str\)"),
    ("per_device_train_batch_size=0", r"`per_device_train_batch_size` must be an integer >= 1, got 0"),
    ("distillers=[{name: kll}]", r"Unknown distiller 'kll'"),
    ("distillers=[{name: kl, temperature: two}]", r"Distiller 'kl': `temperature` must be a number"),
    ("dataset=./my_data.csv", r"`dataset`='./my_data.csv' looks like a local path, and it does not exist"),
    ("teacher=~/no/such/teacher", r"`teacher`='~/no/such/teacher' looks like a local path"),
])
def test_cli_show_refuses_bad_values_naming_the_setting(toy, override, fragment, capsys):
    recipe, config_path = toy
    with pytest.raises((ValueError, FileNotFoundError), match=fragment):
        recipe.parse_dict(load_config(config_path, [override]))
    with pytest.raises(SystemExit):
        cli_main(["show", str(config_path), override])
    assert "Traceback" not in capsys.readouterr().err


def test_numbers_given_as_strings_are_converted(toy):
    recipe, config_path = toy
    args, training_args = recipe.parse_dict(load_config(config_path, ["max_steps='7'", "learning_rate='2e-3'"]))
    assert training_args.max_steps == 7 and training_args.learning_rate == 2e-3


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(toy, tmp_path):
    _, config_path = toy
    config_path.write_text("max_steps: 3\ndistillers: [{name: kl\n")
    with pytest.raises(ValueError, match=rf"{config_path}:3:1: YAML syntax error"):
        load_config(config_path)


def test_the_auto_teacher_cache_folder_follows_the_teacher_dtype(tmp_path):
    from types import SimpleNamespace

    from transformers import default_data_collator

    from conftest import bert, text_classification_data
    from hf_kd.recipes.teacher_cache import cache_folder

    args = SimpleNamespace(cache_dir=str(tmp_path), teacher_cache_top_k=64, teacher_cache_dtype="float16")
    data, teacher = text_classification_data(n=4), bert()
    fp32 = cache_folder("toy", args, teacher, "t", data, default_data_collator, None)
    assert cache_folder("toy", args, teacher, "t", data, default_data_collator, None) == fp32
    assert cache_folder("toy", args, teacher.to(torch.bfloat16), "t", data, default_data_collator, None) != fp32


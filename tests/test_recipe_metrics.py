"""Metrics and latency of the recipes: evaluate's modules or the built-in fallback (the same numbers, one notice),
GLUE's metric sets by task (CoLA, STS-B regression) through the text recipe on tiny local data, and latencies of
several models measured interleaved."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import evaluate
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from transformers import AutoModelForSequenceClassification, EvalPrediction

from conftest import save_tiny_bert_encoder
from hf_kd.recipes import ModelResult, load_recipe, results_table
from hf_kd.recipes.classification import Metrics, task_metrics
from hf_kd.recipes.report import measure_latencies

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "text_classification.yaml"
RECIPE = load_recipe(CONFIG)
WORDS = "good fine great nice bad awful poor wrong cat dog runs sits".split()
FAST = ["--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
        "--logging_steps", "1", "--eval_steps", "1", "--disable_tqdm", "true", "--no_baseline"]
LOGGER = "hf_kd.recipes.classification"


def offline(monkeypatch) -> None:
    def load(path, *args, **kwargs):
        raise FileNotFoundError(f"Couldn't find a module script at {path}. Module doesn't exist on the Hub either.")

    monkeypatch.setattr(evaluate, "load", load)


def prediction(logits, labels) -> EvalPrediction:
    return EvalPrediction(predictions=np.asarray(logits), label_ids=np.asarray(labels))


def test_fallback_gives_the_builtin_numbers_with_one_notice(monkeypatch, caplog):
    offline(monkeypatch)
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(40, 2)), rng.integers(0, 2, 40)
    metrics = Metrics(("accuracy", "f1", "matthews_correlation"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scores = metrics(prediction(logits, labels))
        again = metrics(prediction(logits, labels))  # loaded once: no second notice
    predicted = logits.argmax(-1)
    assert scores == again == pytest.approx({"accuracy": (predicted == labels).mean(),
                                             "f1": f1_score(labels, predicted),
                                             "matthews_correlation": matthews_corrcoef(labels, predicted)})
    notices = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert "accuracy, f1, matthews_correlation" in notices[0] and "FileNotFoundError" in notices[0]

    three = rng.normal(size=(30, 3))
    classes = rng.integers(0, 3, 30)
    assert Metrics()(prediction(three, classes))["macro_f1"] == pytest.approx(
        f1_score(classes, three.argmax(-1), average="macro"))
    scores, targets = rng.normal(size=(50, 1)), rng.uniform(0, 5, 50)
    regression = Metrics(("pearson", "spearmanr", "mse"), regression=True)(prediction(scores, targets))
    assert regression == pytest.approx({"pearson": pearsonr(scores[:, 0], targets)[0],
                                        "spearmanr": spearmanr(scores[:, 0], targets)[0],
                                        "mse": np.mean((scores[:, 0] - targets) ** 2)})


ACCURACY_SCRIPT = '''
import datasets
import evaluate


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="local", citation="", inputs_description="", features=datasets.Features(
            {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        return {"accuracy": 0.125}  # a sentinel: the number came from this module
'''


def test_metric_path_loads_a_local_evaluate_module(tmp_path, caplog):
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "accuracy" / "accuracy.py").write_text(ACCURACY_SCRIPT)
    metrics = Metrics(("accuracy",), metric_path=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert metrics(prediction([[0.0, 1.0], [1.0, 0.0]], [1, 0])) == {"accuracy": 0.125}
    assert not [r for r in caplog.records if r.name == LOGGER]


def test_metric_sets_by_task():
    from hf_kd.recipes import Classes

    binary, regression = Classes(["no", "yes"]), Classes([], regression=True)
    assert task_metrics("cola", binary) == ("matthews_correlation",)
    assert task_metrics("stsb", regression) == ("pearson", "spearmanr")
    assert task_metrics("mrpc", binary) == task_metrics("qqp", binary) == ("accuracy", "f1")
    assert task_metrics("sst2", binary) == ("accuracy", "f1")
    assert task_metrics(None, Classes(["a", "b", "c"])) == ("accuracy", "macro_f1")
    assert task_metrics(None, regression) == ("pearson", "spearmanr", "mse")
    assert regression.config == {"num_labels": 1, "problem_type": "regression"}
    with pytest.raises(ValueError, match="Unknown metrics"):
        Metrics(("bleu",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A random-init 2-layer BERT encoder with a word-level tokenizer; a CoLA-like csv (0/1) and an STS-B-like csv
    (a float score in [0, 5])."""
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_bert_encoder(folder / "teacher", WORDS)
    generator = torch.Generator().manual_seed(0)
    files = {}
    for name, column in (("cola", "label"), ("stsb", "score")):
        rows = []
        for i in range(40):
            picks = torch.randint(0, len(WORDS), (4,), generator=generator).tolist()
            good = sum(p < 4 for p in picks)
            label = int(i % 2) if name == "cola" else round(5 * good / 4 + 0.25, 2)
            rows.append({"sentence": " ".join(WORDS[p] for p in picks), column: label})
        files[name] = str(folder / f"{name}.csv")
        with open(files[name], "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["sentence", column])
            writer.writeheader()
            writer.writerows(rows)
    return {"teacher": str(folder / "teacher"), **files}


def argv(tiny: dict[str, str], tmp_path: Path, task: str) -> list[str]:
    return ["--teacher", tiny["teacher"], "--dataset", tiny[task], "--task", task, "--text_column", "sentence",
            "--label_column", "label" if task == "cola" else "score", "--student_hidden_size", "16",
            "--student_heads", "2", "--student_intermediate_size", "32", "--output_dir", str(tmp_path / task),
            "--cache_dir", str(tmp_path / "cache"), *FAST]


@pytest.mark.usefixtures("one_thread")
def test_cola_reports_matthews_correlation(tiny, tmp_path, monkeypatch, caplog):
    offline(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result = RECIPE.main(argv(tiny, tmp_path, "cola"))
    data = json.loads((Path(result["output_dir"]) / "results.json").read_text())
    for row in data.values():
        assert list(row["metrics"]) == ["matthews_correlation"] and -1 <= row["metrics"]["matthews_correlation"] <= 1
    assert len({r.getMessage() for r in caplog.records if "matthews_correlation" in r.getMessage()}) == 1


@pytest.mark.usefixtures("one_thread")
def test_stsb_regression_distils_with_mse(tiny, tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    result = RECIPE.main(argv(tiny, tmp_path, "stsb"))
    assert "distilling with `mse` on the logits" in capsys.readouterr().out
    data = json.loads((Path(result["output_dir"]) / "results.json").read_text())
    for row in data.values():
        assert list(row["metrics"]) == ["pearson", "spearmanr"]
        assert all(-1 <= v <= 1 or np.isnan(v) for v in row["metrics"].values())
    student = AutoModelForSequenceClassification.from_pretrained(result["student_path"])
    teacher = AutoModelForSequenceClassification.from_pretrained(result["teacher_path"])
    for model in (student, teacher):  # the teacher fine-tuned with the model's MSE loss
        assert (model.config.num_labels, model.config.problem_type) == (1, "regression")
    assert '[{"name": "mse"}]' in (Path(result["student_path"]) / "README.md").read_text()
    args, training_args = RECIPE.parse_argv([*argv(tiny, tmp_path, "stsb"), "--distillers",
                                             '[{"name": "kl", "temperature": 4.0}]'])
    with pytest.raises(ValueError, match=r"regression.*\['kl'\].*mse"):
        RECIPE.run(args, training_args)


class Recorder(torch.nn.Module):
    """A tiny MLP that records, per forward, its name, the thread count and whether it ran in eval mode."""

    def __init__(self, name: str, calls: list) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.name, self.calls = name, calls
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))

    def forward(self, inputs):
        self.calls.append((self.name, torch.get_num_threads(), self.training, torch.is_inference_mode_enabled()))
        return self.net(inputs)


def test_latencies_interleaved_and_alike_for_one_architecture():
    calls = []
    models = {"a": Recorder("a", calls).train(), "b": Recorder("b", calls).train()}
    threads = torch.get_num_threads()
    latencies = measure_latencies(models, {"inputs": torch.randn(8, 64)}, repeats=200, warmup=5, threads=1)
    assert [c[0] for c in calls] == ["a"] * 5 + ["b"] * 5 + ["a", "b"] * 200  # warm-up, then round-robin
    assert all(c[1:] == (1, False, True) for c in calls)  # one thread, eval mode, inference mode
    assert torch.get_num_threads() == threads and all(m.training for m in models.values())  # restored
    a, b = latencies["a"], latencies["b"]
    assert a.repeats == b.repeats == 200 and a.threads == 1
    assert 0 < a.min_ms <= a.median_ms <= a.max_ms and a.spread_ms >= 0
    assert 0.5 < a.median_ms / b.median_ms < 2  # one architecture: the same latency within noise


def test_table_shows_median_and_spread():
    result = ModelResult("student", 10, 40, 0.912, {"accuracy": 0.5}, 1.0, latency_spread_ms=0.034)
    assert "| student | 10 | 0.00 | 0.91 ± 0.03 | 0.5 |" in results_table({"student": result})

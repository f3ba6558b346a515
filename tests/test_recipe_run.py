"""The run every recipe shares, ``hf_kd.recipes.run_recipe``: one result shape and the files it writes, on tiny ViTs
(each recipe's tests check that its ``run`` returns this shape)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from conftest import image_data, vit
from hf_kd import DistillationArguments
from hf_kd.recipes import (
    PhaseTimer,
    RunOutput,
    Teacher,
    classification_metrics,
    evaluate_model,
    run_recipe,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY = {"name", "params", "size_on_disk_bytes", "latency_ms", "latency_spread_ms", "metrics", "train_seconds"}


def arguments(tmp_path: Path, **extra) -> DistillationArguments:
    return DistillationArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=8, eval_strategy="steps", eval_steps=1, logging_steps=1,
                                 save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                                 distillers=[{"name": "kl", "temperature": 2.0}], **extra)


def run(tmp_path: Path, **options) -> tuple[RunOutput, dict]:
    """run_recipe on a 2-layer ViT teacher (saved, as a cached teacher is) and a 1-layer student."""
    data = image_data(n=16).with_format("torch")
    teacher = vit(layers=2, hidden=32, seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    student = vit(layers=1, hidden=16, seed=2)
    timer = PhaseTimer()
    with timer.phase("prepare"):
        pieces = dict(teacher=Teacher(teacher, tmp_path / "teacher", "tiny teacher", 1.5, [{"loss": 1.0, "step": 1}]),
                      student=student, train_dataset=data, eval_dataset=data, compute_metrics=classification_metrics,
                      latency_batch={"pixel_values": data[:4]["pixel_values"]}, dataset="tiny images",
                      plot_metric="accuracy", timer=timer)
    return run_recipe("tiny", options.pop("training_args", arguments(tmp_path)), **{**pieces, **options}), pieces


def test_one_result_shape_and_its_files(tmp_path):
    out, pieces = run(tmp_path, baseline=copy.deepcopy(vit(layers=1, hidden=16, seed=2)), metrics=("accuracy",))
    assert set(out) == set(RunOutput.__annotations__)
    assert list(out["results"]) == ["teacher", "baseline", "student"]
    assert [r.name for r in out["results"].values()] == ["teacher", "baseline", "student"]
    assert out["student"] is pieces["student"]  # distilled in place
    assert list(out["seconds"]) == ["prepare", "teacher_eval", "baseline", "distillation", "total"]
    assert list(out["histories"]) == ["teacher", "baseline", "distillation"]
    assert out["teacher_path"] == str(tmp_path / "teacher")
    output = tmp_path / "out"
    assert (out["output_dir"], out["student_path"]) == (str(output), str(output / "student"))

    saved = json.loads(Path(out["results_json"]).read_text())
    assert list(saved) == ["teacher", "baseline", "student"]
    for role, entry in saved.items():
        assert set(entry) == ENTRY | ({"retention"} if role != "teacher" else set())
        assert set(entry["metrics"]) == {"accuracy"}
        assert entry["params"] > 0 and entry["size_on_disk_bytes"] > 0 and entry["latency_ms"] > 0
        assert entry["latency_spread_ms"] >= 0
        teacher_accuracy = saved["teacher"]["metrics"]["accuracy"]
        if role != "teacher":  # metric / the teacher's (a teacher scoring 0 gives no ratio)
            expected = {"accuracy": entry["metrics"]["accuracy"] / teacher_accuracy} if teacher_accuracy else {}
            assert entry["retention"] == pytest.approx(expected)
        assert entry["train_seconds"] == 1.5 if role == "teacher" else entry["train_seconds"] > 0
    assert saved["baseline"]["params"] == saved["student"]["params"] < saved["teacher"]["params"]
    markdown = Path(out["results_md"]).read_text()
    ratio = saved["teacher"]["params"] / saved["student"]["params"]
    assert f"Compression: {ratio:.1f}x fewer parameters." in markdown
    if saved["student"]["retention"]:
        share = saved["student"]["retention"]["accuracy"]
        assert f"Retention of the student (metric / the teacher's): accuracy {share:.1%}." in markdown
    assert "Wall seconds per phase: prepare 0, teacher_eval " in markdown and ", total " in markdown
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for role in ("baseline", "student"):
        assert (output / role / "config.json").is_file()
    card = Path(out["model_card"]).read_text()
    assert out["model_card"] == str(output / "student" / "README.md")
    assert "`tiny` from the teacher `tiny teacher` on `tiny images`" in card
    assert '[{"name": "kl", "temperature": 2.0}]' in card and "| student |" in card
    assert "base_model" not in yaml.safe_load(card.split("---\n")[1])


def test_options(tmp_path):
    """No baseline, role labels, a derived metric, extra result fields, notes from the results, a plain evaluation,
    other distillers for the distillation phase and the card's base model."""
    def metrics(values: dict) -> dict:
        return {"accuracy": values["eval_accuracy"], "error": 1 - values["eval_accuracy"]}

    distillation_args = arguments(tmp_path, hard_label_weight=0.0)
    distillation_args.distillers = [{"name": "mse"}]
    out, pieces = run(tmp_path, baseline=None, metrics=metrics, labels={"student": "student (KD)"},
                 extra=lambda model: {"layers": model.config.num_hidden_layers},
                 notes=lambda results: [f"{len(results)} models."], plain_evaluation=True,
                 distillation_args=distillation_args, base_model="org/tiny-vit")
    results = out["results"]
    assert list(results) == ["teacher", "student"] and results["student"].name == "student (KD)"
    assert list(out["seconds"]) == ["prepare", "teacher_eval", "distillation", "total"]
    saved = json.loads(Path(out["results_json"]).read_text())
    assert set(saved["student"]) == ENTRY | {"retention", "layers"} and saved["student"]["layers"] == 1
    assert results["teacher"].extra == {"layers": 2}
    assert results["student"].metrics["error"] == pytest.approx(1 - results["student"].metrics["accuracy"])
    evals = [entry for entry in out["histories"]["distillation"] if "eval_loss" in entry]
    assert evals and all(entry["eval_error"] == pytest.approx(1 - entry["eval_accuracy"]) for entry in evals)
    plain = evaluate_model(out["student"], arguments(tmp_path), pieces["eval_dataset"], classification_metrics)
    assert results["student"].metrics["accuracy"] == plain["eval_accuracy"]
    markdown = Path(out["results_md"]).read_text()
    assert "| student (KD) |" in markdown and "\n\n2 models.\n\nCompression:" in markdown
    card = Path(out["model_card"]).read_text()
    assert '[{"name": "mse"}]' in card and yaml.safe_load(card.split("---\n")[1])["base_model"] == "org/tiny-vit"

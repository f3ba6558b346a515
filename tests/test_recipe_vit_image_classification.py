"""Smoke tests of recipes/vit_image_classification.py: digits with kl (through ``hf-kd run``), a local imagefolder of
PNGs with DeiT's distillation token, and a parquet file of images with a given teacher and student to fine-tune."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from hf_kd.cli import main as cli_main
from hf_kd.recipes import RunOutput, load_config, load_recipe

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "vit_image_classification.yaml"
ROLES = ("teacher", "baseline", "student")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def run_recipe(**overrides) -> dict:
    recipe = load_recipe(CONFIG)
    return recipe.run(*recipe.parse_dict({**load_config(CONFIG), **overrides}))


def check_results(output_dir: Path, roles=ROLES) -> dict:
    """results.json has every field with sane values; results.md, the PNG plot and the model card exist."""
    results = json.loads((output_dir / "results.json").read_text())
    assert set(results) == set(roles)
    for role in roles:
        row = results[role]
        assert row["params"] > 0 and row["size_on_disk_bytes"] > 0 and row["latency_ms"] > 0
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
    for role in set(roles) & {"baseline", "student"}:
        assert results[role]["train_seconds"] > 0
    assert results["teacher"]["params"] >= 10 * results["student"]["params"]
    assert (output_dir / "history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| student (KD) |" in (output_dir / "results.md").read_text()
    assert "hf-kd run recipes/vit_image_classification.yaml" in (output_dir / "student" / "README.md").read_text()
    return results


def reloaded_logits(student_dir: Path, images: list) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The saved student and processor alone: the model, the processed images and its logits on them."""
    processor = AutoImageProcessor.from_pretrained(student_dir)
    model = AutoModelForImageClassification.from_pretrained(student_dir).eval()
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model, pixels, model(pixel_values=pixels).logits


def test_digits_kl_through_the_cli(tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert cli_main(["run", str(CONFIG), "max_steps=3", f"output_dir={output_dir}", f"cache_dir={tmp_path / 'cache'}",
                     "eval_steps=2", "logging_steps=1", "distillers=[{name: kl, temperature: 3.0}]"]) == 0
    module = sys.modules[load_recipe(CONFIG).run.__module__]
    results = check_results(output_dir)
    assert results["student"]["params"] == 9674 and results["teacher"]["params"] == 136138
    assert "| student (KD) |" in capsys.readouterr().out
    assert "`[{'name': 'kl', 'temperature': 3.0}]`, hard_label_weight=1.0" in (output_dir / "results.md").read_text()
    cached = list((tmp_path / "cache" / "vit_image_classification").iterdir())
    assert [p.name for p in cached] == ["teacher-vit4x64h4i128-p2-digits-nNone-img8c1-e40-lr0.002-steps3-seed0"]

    # The saved student reproduces the reported accuracy from raw PIL digits, through its own processor.
    _, test = module.digits_splits()
    model, _, logits = reloaded_logits(output_dir / "student", list(test["image"]))
    assert type(model) is ViTForImageClassification
    correct = (logits.argmax(-1) == torch.tensor(test["label"])).sum().item()
    assert correct == round(results["student"]["metrics"]["accuracy"] * len(test))


def write_imagefolder(root: Path, per_class: int = 6, size: int = 16) -> Path:
    """Two classes of RGB PNGs: dark and bright squares with noise."""
    rng = np.random.default_rng(0)
    for name, level in (("dark", 40), ("bright", 210)):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(level + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            PILImage.fromarray(pixels).save(root / name / f"{index}.png")
    return root


def test_imagefolder_with_deit_hard(tmp_path):
    folder = write_imagefolder(tmp_path / "images")
    output_dir = tmp_path / "out"
    result = run_recipe(dataset=str(folder), image_size=16, num_channels=3, patch_size=4, deit="hard", max_steps=2,
                        eval_fraction=0.25, output_dir=str(output_dir), cache_dir=str(tmp_path / "cache"))
    check_results(output_dir)
    assert result["results"]["student"].name == "student (KD)"
    assert set(result) == set(RunOutput.__annotations__)  # the shared run's one result shape
    config = json.loads((output_dir / "student" / "config.json").read_text())
    assert config["architectures"] == ["DeiTForImageClassificationWithTeacher"]
    assert sorted(config["id2label"].values()) == ["bright", "dark"]
    assert json.loads((output_dir / "baseline" / "config.json").read_text())["architectures"] == [
        "DeiTForImageClassification"]

    images = [PILImage.open(path) for path in sorted(folder.glob("*/*.png"))]
    model, pixels, logits = reloaded_logits(output_dir / "student", images)
    assert type(model) is DeiTForImageClassificationWithTeacher and pixels.shape == (12, 3, 16, 16)
    with torch.no_grad():
        outputs = model(pixel_values=pixels)
    assert torch.allclose(logits, (outputs.cls_logits + outputs.distillation_logits) / 2)


def test_parquet_with_given_teacher_and_student(tmp_path):
    """A teacher with other labels is fine-tuned (and cached); a given student gets the data's labels."""
    rng = np.random.default_rng(1)
    features = Features({"picture": Image(), "digit": ClassLabel(names=["a", "b", "c"])})
    images = [PILImage.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8), mode="L") for _ in range(15)]
    Dataset.from_dict({"picture": images, "digit": [i % 3 for i in range(15)]}, features=features).to_parquet(
        tmp_path / "pictures.parquet")

    def save_vit(path: Path, layers: int, hidden: int, labels: int) -> str:
        torch.manual_seed(0)
        ViTForImageClassification(ViTConfig(image_size=12, patch_size=4, num_channels=1, hidden_size=hidden,
                                            num_hidden_layers=layers, num_attention_heads=2,
                                            intermediate_size=2 * hidden, num_labels=labels)).save_pretrained(path)
        ViTImageProcessorPil(size={"height": 12, "width": 12}, image_mean=[0.5], image_std=[0.5]).save_pretrained(path)
        return str(path)

    teacher, student = save_vit(tmp_path / "teacher", 4, 64, 5), save_vit(tmp_path / "student", 1, 16, 5)
    output_dir = tmp_path / "out"
    common = dict(dataset=str(tmp_path / "pictures.parquet"), image_column="picture", label_column="digit",
                  teacher=teacher, student=student, baseline=False, max_steps=2, output_dir=str(output_dir),
                  cache_dir=str(tmp_path / "cache"))
    result = run_recipe(**common)
    check_results(output_dir, roles=("teacher", "student"))
    assert Path(result["teacher_path"]).parent == tmp_path / "cache" / "vit_image_classification"
    assert json.loads((output_dir / "student" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b",
                                                                                            "2": "c"}
    with pytest.raises(ValueError, match="no column 'image' .`image_column`"):
        run_recipe(**{**common, "image_column": "image"})


def test_assistants_are_prepared_reported_and_distilled_from(tmp_path, monkeypatch):
    """`assistants=[path]`: the assistant is loaded (its classes match), reported as `assistant_1`, and the student
    distils from `[teacher, assistant]`: the trainer receives both, and dgkd logs a drop per guide."""
    first = run_recipe(max_steps=2, output_dir=str(tmp_path / "a"), cache_dir=str(tmp_path / "cache"),
                       baseline=False, eval_strategy="no")
    assistant = first["student_path"]  # a trained student-sized model: the assistant of the next run
    from hf_kd import DistillationTrainer

    received = []
    init = DistillationTrainer.__init__

    def spy(self, *args, **kwargs):
        received.append(kwargs["teacher_model"])
        init(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "__init__", spy)
    out = run_recipe(max_steps=2, output_dir=str(tmp_path / "b"), cache_dir=str(tmp_path / "cache"),
                     eval_strategy="no", logging_steps=1, assistants=[assistant],
                     distillers=[{"name": "dgkd", "drop_num": 1, "temperature": 4.0}])
    results = check_results(tmp_path / "b", roles=(*ROLES, "assistant_1"))
    assert results["assistant_1"]["params"] == results["student"]["params"]
    assert results["assistant_1"]["name"] == f"assistant_1 ({assistant})"
    [teachers] = received
    assert isinstance(teachers, list) and len(teachers) == 2
    assert teachers[1] is not teachers[0] and out["teacher_path"] == first["teacher_path"]
    logged = [entry for entry in out["histories"]["distillation"] if "loss" in entry]
    assert logged and all(e["loss/dgkd/dropped_0"] + e["loss/dgkd/dropped_1"] == 1 for e in logged)

"""Nothing trained is lost: a save that fails at any file write leaves the previous complete checkpoint, which
resumes exactly; resume refuses checkpoints that lack state the distillers need or that other distillers wrote."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers.modeling_utils
from transformers.trainer_callback import TrainerState

import hf_kd.checkpoints
from conftest import bert, text_classification_data
from hf_kd import DistillationArguments, DistillationTrainer
from hf_kd.checkpoints import DISTILLER_STATE_NAME, MANIFEST_NAME, TEACHER_STATE_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

DISTILLERS = [{"name": "atsc"}, {"name": "hidden_states", "projector": "linear"}]  # teacher-side + distiller state


def build(output_dir, distillers=DISTILLERS, **overrides):
    args = DistillationArguments(**{
        "output_dir": output_dir, "report_to": [], "use_cpu": True, "disable_tqdm": True, "seed": 0,
        "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 1, "logging_steps": 1,
        "per_device_train_batch_size": 4, "learning_rate": 1e-2, **overrides})
    return DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2), args=args,
                               train_dataset=text_classification_data(n=16), distillers=distillers)


class DiskFull(OSError):
    pass


WRITERS = [  # every function a checkpoint writes files with
    (torch, "save"), (transformers.modeling_utils, "safe_save_file"), (TrainerState, "save_to_json"),
    (hf_kd.checkpoints, "_write_json"),
]


def fail_at_write(monkeypatch, trainer, index: int, step: int) -> list[str]:
    """Make the ``index``-th file write while saving checkpoint ``step`` raise; returns what was written."""
    written: list[str] = []
    for owner, name in WRITERS:
        original = getattr(owner, name)

        def writer(*args, _original=original, _name=name, **kwargs):
            if trainer.state.global_step == step and trainer._checkpoint_folder is not None:
                if len(written) == index:
                    raise DiskFull(f"disk full at write {index} ({_name})")
                written.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, writer)
    return written


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (module fixtures run before the function-scoped one_thread)
    trainer = build(str(tmp_path_factory.mktemp("reference")))
    trainer.train()
    torch.set_num_threads(threads)
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_every_checkpoint_file_is_counted(tmp_path, monkeypatch):
    trainer = build(str(tmp_path))
    written = fail_at_write(monkeypatch, trainer, index=10**6, step=4)
    trainer.train()
    folder = tmp_path / "checkpoint-4"
    assert {DISTILLER_STATE_NAME, TEACHER_STATE_NAME, MANIFEST_NAME, "trainer_state.json"} <= set(os.listdir(folder))
    assert written[-1] == "save_to_json" and len(written) >= 8  # trainer_state.json is written last
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert [d["name"] for d in manifest["distillers"]] == ["atsc", "hidden_states"]
    assert [d["spec"] for d in manifest["distillers"]] == DISTILLERS
    assert manifest["state_files"] == [DISTILLER_STATE_NAME, TEACHER_STATE_NAME]
    assert not (tmp_path / "checkpoint-2").exists()  # rotated away once checkpoint-4 was complete


@pytest.mark.parametrize("index", range(9))
def test_a_failed_save_keeps_the_previous_checkpoint_which_resumes_exactly(tmp_path, monkeypatch, index,
                                                                          uninterrupted):
    trainer = build(str(tmp_path))
    fail_at_write(monkeypatch, trainer, index=index, step=4)
    with pytest.raises(DiskFull):
        trainer.train()
    monkeypatch.undo()
    previous = tmp_path / "checkpoint-2"
    assert {DISTILLER_STATE_NAME, TEACHER_STATE_NAME, "trainer_state.json"} <= set(os.listdir(previous))
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path / "checkpoint-4"))
    resumed = build(str(tmp_path))
    resumed.train(resume_from_checkpoint=True)  # skips the incomplete checkpoint-4
    for name, value in resumed.model.named_parameters():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0, msg=name)


def test_resume_without_distiller_state_names_the_missing_file(tmp_path):
    build(str(tmp_path), max_steps=2).train()
    os.remove(tmp_path / "checkpoint-2" / TEACHER_STATE_NAME)
    with pytest.raises(ValueError, match=r"has no teacher_trained.pt, which holds the teacher-side parameters"):
        build(str(tmp_path)).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(ValueError, match="No complete checkpoint found"):
        build(str(tmp_path)).train(resume_from_checkpoint=True)


def test_resume_with_other_distillers_lists_both(tmp_path):
    build(str(tmp_path), max_steps=2).train()
    other = [{"name": "kl"}, {"name": "hidden_states", "projector": "linear"}]
    with pytest.raises(ValueError, match=r"distillers differ from the checkpoint's.*\[atsc \(atsc\), hidden_states "
                                         r"\(hidden_states\)\].*\[kl \(kl\), hidden_states \(hidden_states\)\]"):
        build(str(tmp_path), distillers=other).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_resume_with_changed_options_is_refused_with_the_reason(tmp_path):
    build(str(tmp_path), max_steps=2, distillers=[{"name": "hidden_states", "projector": "linear"}]).train()
    changed = [{"name": "hidden_states", "projector": "linear", "projector_per_layer": True}]
    with pytest.raises(ValueError, match="does not fit the distillers' current options"):
        build(str(tmp_path), distillers=changed).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_exported_student_folder_holds_no_distillation_state(tmp_path):
    trainer = build(str(tmp_path), max_steps=1, save_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "student"))
    files = set(os.listdir(tmp_path / "student"))
    assert not files & {DISTILLER_STATE_NAME, TEACHER_STATE_NAME, MANIFEST_NAME}

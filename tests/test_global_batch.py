"""The normalisation rule over the whole registry: one optimizer step on a fixed batch of 8 (uneven padding) gives the
same logged losses and the same update of everything that learns, whether it runs as 1 x 8, 2 x 4 or 8 x 1
(gradient accumulation); and the exported student holds exactly what a plain ``save_pretrained`` writes and
reloads with identical logits. A distiller added to hf_kd later must get a case in CASES, or the first test fails."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

from conftest import EAGER, bert, deit, image_data, llama, lm_data, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer, build_distiller, list_distillers
from hf_kd.distillers.base import _REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

BUILTIN = sorted(name for name in list_distillers() if _REGISTRY[name].__module__.startswith("hf_kd."))


@dataclass
class Case:
    family: str  # text (BERT classifiers), lm (Llama causal LMs, padded), deit (DeiT student, ViT teacher)
    options: dict = field(default_factory=dict)
    hard_label_weight: float = 1.0
    teacher: dict = field(default_factory=dict)  # overrides of the teacher's factory arguments
    args: dict = field(default_factory=dict)  # extra DistillationArguments


CASES: dict[str, Case] = {
    **{name: Case("lm", {"temperature": 2.0}) for name in ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl",
                                                             "tvd", "dkd")},
    "mse": Case("lm"),
    "dgkd": Case("lm", {"temperature": 2.0, "drop_num": 0}),  # one teacher: nothing to drop
    "ces_kd": Case("lm", {"temperature": 2.0}),
    "virtual_teacher": Case("lm", {"temperature": 2.0}),  # reads no teacher: the pass without one
    "okd": Case("lm", {"temperature": 2.0}),
    "hidden_states": Case("text", {"loss": "mse", "projector": "linear"}),
    "attention": Case("text", {"loss": "kl"}),
    "feature": Case("text", {"student_module": "bert.encoder.layer.1.output",
                             "teacher_module": "bert.encoder.layer.2.output"}),
    "minilm_relation": Case("text"),
    "rkd": Case("text", {"embedding": "mean"}),
    "sp": Case("text"),
    "pkt": Case("text", {"layers": {1: 2, 2: 4}, "intermediate_weight": 10.0}),
    "anchor_relation": Case("text", {"anchors": "learned", "embedding": "mean"}),  # fixed anchors: per sample
    "fsp": Case("text", {"layers": {1: 2, 2: 4}}),
    "topology": Case("text", {"seed": 0}),
    "crd": Case("text", {"nce_k": 4}),
    "tinybert": Case("text", {"temperature": 2.0}),
    "composite": Case("text", {"components": {"kl": {"name": "kl"}, "hidden": {"name": "hidden_states"},
                                              "attention": {"name": "attention", "loss": "mse"}}}),
    "instance_feature": Case("text", {"query": "last"}),
    "feature_mixing": Case("text", {"ratio": 0.0}),  # random masks are drawn per micro-batch: exact with none
    "block_swap": Case("text", {"swap_prob": 1.0}, teacher={"hidden": 32}),  # every block swapped: no draw
    "atsc": Case("text"),
    "sokd": Case("text"),
    "bdkd": Case("text", {"online_teacher": True}),
    "dualde": Case("text", {"stage2_step": 0}, hard_label_weight=0.0),
    "mutual": Case("text", {"seed": 0}),
    "p2p": Case("text", {"seed": 0}),
    "deit": Case("deit", {"distillation_type": "soft", "temperature": 2.0}, hard_label_weight=0.0,
                 args={"label_names": ["labels"]}),  # its forward takes no labels: keep the column
}


def models_and_data(case: Case):
    if case.family == "text":
        teacher = {"layers": 4, "hidden": 48, "seed": 2, **EAGER, **case.teacher}
        return bert(seed=1, **EAGER), bert(**teacher), text_classification_data(n=8)
    if case.family == "lm":
        return llama(seed=1), llama(layers=3, hidden=48, seed=2, **case.teacher), lm_data(n=8)
    return deit(seed=1), vit(layers=2, hidden=16, patch_size=4, seed=2), image_data(n=8)


def one_step(name: str, micro_batch: int, output_dir: str, trainer_out: list | None = None,
             each_teacher: bool = False):
    """One optimizer step of ``name`` on its case; ``each_teacher``: with ``teacher: "all"`` over two copies of the
    teacher, the second copy of the distiller starting from the first one's state."""
    case = CASES[name]
    student, teacher, data = models_and_data(case)
    options = {**case.options, "teacher": "all"} if each_teacher else case.options
    teacher = [teacher, copy.deepcopy(teacher)] if each_teacher else teacher
    args = DistillationArguments(
        output_dir=output_dir, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
        max_steps=1, logging_steps=1, per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=8 // micro_batch, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
        lr_scheduler_type="constant", hard_label_weight=case.hard_label_weight, **case.args,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  distillers=[{"name": name, **options}])
    if each_teacher:
        copies = trainer.distillers[0].components
        copies["teacher1"].load_state_dict(copies["teacher0"].state_dict())
    learners = {"student": dict(student.named_parameters()),
                "distillers": dict(trainer.distillers.named_parameters()),
                "teacher": trainer._trained_teacher_state()}
    before = {group: {n: p.detach().clone() for n, p in params.items()} for group, params in learners.items()}
    trainer.train()
    after = {"student": dict(student.named_parameters()), "distillers": dict(trainer.distillers.named_parameters()),
             "teacher": trainer._trained_teacher_state()}
    # An update is read as a difference of stored parameters, so it is known to one float step of the parameter.
    updates = {group: {n: (after[group][n].detach() - value, torch.finfo(value.dtype).eps * value.abs())
                       for n, value in params.items()} for group, params in before.items()}
    logs = {k: v for k, v in trainer.state.log_history[0].items() if k == "loss" or k.startswith("loss/")}
    if trainer_out is not None:
        trainer_out.append(trainer)
    return logs, updates


def test_every_builtin_distiller_has_a_case():
    assert sorted(CASES) == BUILTIN, "add a Case for each new distiller to CASES"


@pytest.mark.parametrize("name", BUILTIN)
def test_one_step_is_the_same_for_every_split_of_the_global_batch(name, tmp_path):
    if build_distiller({"name": name, **CASES[name].options}).batch_level:
        pytest.skip("batch-level terms are weighted by micro-batch share; see their own tests")
    reference_logs, reference = one_step(name, 8, str(tmp_path / "a"))
    assert all(torch.isfinite(torch.tensor(v)) for v in reference_logs.values()), reference_logs
    moved = [n for n, (u, _) in reference["student"].items() if u.abs().max() > 0]
    assert moved, "the step must update the student"
    for micro_batch in (4, 1):
        logs, updates = one_step(name, micro_batch, str(tmp_path / f"b{micro_batch}"))
        assert logs.keys() == reference_logs.keys()
        for key, value in reference_logs.items():
            assert logs[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                f"{key} differs for {8 // micro_batch} x {micro_batch}")
        for group, params in reference.items():
            for param_name, (update, resolution) in params.items():
                difference = (updates[group][param_name][0] - update).norm()
                assert difference <= 1e-5 * update.norm() + resolution.norm() + 1e-8, (
                    f"{group} {param_name}: update differs by {difference / update.norm().clamp_min(1e-12):.2e} "
                    f"for {8 // micro_batch} x {micro_batch}"
                )


READS_ONE_TEACHER = [n for n in BUILTIN if not _REGISTRY[n].multi_teacher
                     and build_distiller({"name": n, **CASES[n].options}).requires.teacher]


@pytest.mark.parametrize("name", READS_ONE_TEACHER)
def test_each_teacher_over_two_copies_of_the_teacher_is_the_single_teacher_step(name, tmp_path):
    """``teacher: "all"`` over two identical teachers (the distiller's copies in the same state) logs the
    single-teacher losses and updates the student as the single-teacher step does."""
    single_logs, single = one_step(name, 8, str(tmp_path / "one"))
    logs, updates = one_step(name, 8, str(tmp_path / "all"), each_teacher=True)
    assert logs["loss"] == pytest.approx(single_logs["loss"], rel=1e-5, abs=1e-6)
    prefix = f"loss/{name}"
    assert logs[prefix] == pytest.approx(single_logs[prefix], rel=1e-5, abs=1e-6)
    for key, value in single_logs.items():  # the term and its sub-terms, once per copy
        if key.startswith(prefix):
            for copy_key in (f"{prefix}/teacher0{key[len(prefix):]}", f"{prefix}/teacher1{key[len(prefix):]}"):
                assert logs[copy_key] == pytest.approx(value, rel=1e-5, abs=1e-6), copy_key
    for param_name, (update, resolution) in single["student"].items():
        difference = (updates["student"][param_name][0] - update).norm()
        assert difference <= 1e-5 * update.norm() + resolution.norm() + 1e-8, param_name


@pytest.mark.parametrize("name", BUILTIN)
def test_export_holds_only_the_student_and_reloads_with_identical_logits(name, tmp_path):
    from safetensors.torch import load_file

    trained = []
    one_step(name, 8, str(tmp_path / "run"), trained)
    trainer = trained[0]
    trainer.save_model(str(tmp_path / "export"))
    student = trainer.model
    student.save_pretrained(str(tmp_path / "plain"))  # what transformers itself writes for this student
    exported, plain = (load_file(str(tmp_path / folder / "model.safetensors")) for folder in ("export", "plain"))
    assert exported.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.equal(exported[key], value), key
    model_class = getattr(__import__("transformers"), type(student).__name__)
    reloaded = model_class.from_pretrained(  # the same attention kernel as the trained student, for exact logits
        str(tmp_path / "export"), attn_implementation=student.config._attn_implementation).eval()
    student.eval()
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, student(**inputs).logits, rtol=0, atol=0)


def resumable_run(name: str, output_dir: str, resume: str | None = None) -> DistillationTrainer:
    case = CASES[name]
    student, teacher, data = models_and_data(case)
    args = DistillationArguments(
        output_dir=output_dir, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, save_strategy="steps", save_steps=1, learning_rate=1e-3,
        hard_label_weight=case.hard_label_weight, **case.args,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  distillers=[{"name": name, **case.options}])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# transformers 5.24 saves DeiT's weights under their legacy names and does not map them back when Trainer resumes
# from the checkpoint (a plain Trainer resumes the same DeiT student with missing keys); strict: this starts failing
# the day transformers fixes it.
DEIT_RESUME = pytest.mark.xfail(strict=True, reason="transformers does not reload a DeiT checkpoint's renamed keys")


@pytest.mark.parametrize("name", [pytest.param(n, marks=DEIT_RESUME) if n == "deit" else n for n in BUILTIN])
def test_a_run_resumed_from_a_checkpoint_continues_exactly(name, tmp_path):
    """Two steps straight through, and the same run resumed from its step-1 checkpoint: the same student, the same
    distiller state (projectors, banks, peers, branches) and the same trained teacher-side parameters."""
    straight = resumable_run(name, str(tmp_path / "straight"))
    resumed = resumable_run(name, str(tmp_path / "resumed"))  # writes checkpoint-1, then is resumed from it
    resumed = resumable_run(name, str(tmp_path / "resumed"), resume=str(tmp_path / "resumed" / "checkpoint-1"))
    for group in ("model", "distillers"):
        expected, got = (getattr(t, group).state_dict() for t in (straight, resumed))
        assert expected.keys() == got.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=f"{group} {key}")
    for key, value in straight._trained_teacher_state().items():
        torch.testing.assert_close(resumed._trained_teacher_state()[key], value, rtol=1e-5, atol=1e-6, msg=key)

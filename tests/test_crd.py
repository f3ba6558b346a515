"""CRD (``crd``) and the sample-index mechanism it reads: the NCE loss re-derived by hand on both banks, the momentum
update of the banks' rows, the index column reaching the distiller (under shuffling, for ``datasets`` and torch
datasets) and never the models, an exact resume, and an export that holds only the student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import bert, text_classification_data, training_args
from hf_kd import DistillationArguments, DistillationTrainer, ModelView, build_distiller
from hf_kd.architecture import SAMPLE_INDEX
from hf_kd.distillers.crd import nce_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def unit(seed: int, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def nce_by_hand(anchor, positive, negatives, z: float, tau: float, m: int) -> float:
    """``mean_i [-log(h_pos / (h_pos + N/M)) - sum_neg log((N/M) / (h_neg + N/M))]``, ``h = exp(a . x / tau) / Z``."""
    c = negatives.shape[1] / m
    total = 0.0
    for a, p, rows in zip(anchor.tolist(), positive.tolist(), negatives.tolist()):
        h_pos = math.exp(sum(x * y for x, y in zip(a, p)) / tau) / z
        total -= math.log(h_pos / (h_pos + c))
        for row in rows:
            h_neg = math.exp(sum(x * y for x, y in zip(a, row)) / tau) / z
            total -= math.log(c / (h_neg + c))
    return total / len(anchor)


def test_nce_loss_equals_the_definition_computed_by_hand():
    anchor, positive, negatives = unit(0, 3, 5), unit(1, 3, 5), unit(2, 3, 4, 5)
    got = nce_loss(anchor, positive, negatives, torch.tensor(7.5, dtype=torch.float64), 0.07, 10)
    assert got.item() == pytest.approx(nce_by_hand(anchor, positive, negatives, 7.5, 0.07, 10), rel=1e-10)


# ---- the distiller on fixed banks, negatives and Z ----------------------------------------------------------------
def crd_on_bert(dataset_size: int = 10, **options):
    student, teacher = bert(seed=1), bert(layers=3, hidden=48, seed=2)
    distiller = build_distiller({"name": "crd", "feat_dim": 6, "nce_k": 3, **options})
    distiller.dataset_size = dataset_size
    distiller.setup(student, teacher)
    data = text_classification_data(n=4)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    views = [ModelView(model=m.train(), task="classification",
                       hidden_states=m(**batch, output_hidden_states=True).hidden_states) for m in (student, teacher)]
    batch[SAMPLE_INDEX] = torch.tensor([7, 2, 5, 0])
    return distiller, views, batch


def projected(distiller, views):
    with torch.no_grad():
        g_s = F.normalize(distiller.embed_student(views[0].hidden_states[-1][:, 0]), dim=1).double()
        g_t = F.normalize(distiller.embed_teacher(views[1].hidden_states[-1][:, 0]), dim=1).double()
    return g_s, g_t


def test_both_banks_terms_equal_the_definition_with_fixed_bank_negatives_and_z():
    distiller, views, batch = crd_on_bert()
    negatives = torch.tensor([[0, 1, 3], [9, 8, 4], [1, 6, 6], [5, 2, 3]])
    distiller.negatives = lambda index, step: negatives
    distiller.z_teacher_bank.fill_(3.0)
    distiller.z_student_bank.fill_(40.0)
    banks = {role: getattr(distiller, f"bank_{role}").clone().double() for role in ("student", "teacher")}
    g_s, g_t = projected(distiller, views)
    loss, parts = distiller(*views, batch)
    teacher_bank = nce_by_hand(g_s, g_t, banks["teacher"][negatives], 3.0, 0.07, 10)
    student_bank = nce_by_hand(g_t, g_s, banks["student"][negatives], 40.0, 0.07, 10)
    assert parts["teacher_bank"].item() == pytest.approx(teacher_bank, rel=1e-5)
    assert parts["student_bank"].item() == pytest.approx(student_bank, rel=1e-5)
    assert loss.item() == pytest.approx(teacher_bank + student_bank, rel=1e-5)


def test_z_is_estimated_once_on_the_first_training_batch_then_fixed():
    distiller, views, batch = crd_on_bert()
    negatives = torch.tensor([[0, 1, 3], [9, 8, 4], [1, 6, 6], [5, 2, 3]])
    distiller.negatives = lambda index, step: negatives
    bank = distiller.bank_teacher.clone().double()
    g_s, g_t = projected(distiller, views)
    distiller(*views, batch)
    scores = torch.cat([(g_s * g_t).sum(1, keepdim=True), torch.einsum("bd,bnd->bn", g_s, bank[negatives])], 1)
    expected = (scores / 0.07).exp().mean().item() * 10
    assert distiller.z_teacher_bank.item() == pytest.approx(expected, rel=1e-5)
    distiller(*views, batch)
    assert distiller.z_teacher_bank.item() == pytest.approx(expected, rel=1e-5)


def test_negatives_exclude_the_sample_and_cover_the_others():
    distiller, _, _ = crd_on_bert(dataset_size=5, nce_k=4000)
    index = torch.tensor([0, 3, 4])
    drawn = distiller.negatives(index, step=0)
    assert drawn.shape == (3, 4)  # min(nce_k, M - 1)
    drawn = torch.cat([distiller.negatives(index, step) for step in range(100)], 1)
    for i, rows in zip(index.tolist(), drawn.tolist()):
        assert set(rows) == set(range(5)) - {i}


def test_a_samples_negatives_depend_on_the_step_and_its_index_only():
    """So a sample draws the same in any micro-batch or process (2 processes x 4 = 1 x 8), and anew each step."""
    distiller, _, _ = crd_on_bert(dataset_size=50, nce_k=20)
    together = distiller.negatives(torch.tensor([7, 3, 9, 1]), step=5)
    apart = torch.cat([distiller.negatives(torch.tensor([9, 1]), step=5), distiller.negatives(torch.tensor([3]), 5),
                       distiller.negatives(torch.tensor([7]), step=5)])
    torch.testing.assert_close(together, apart[[3, 2, 0, 1]], rtol=0, atol=0)
    assert not torch.equal(distiller.negatives(torch.tensor([7]), step=6), together[:1])


def test_evaluation_contributes_nothing_and_leaves_the_banks():
    distiller, views, batch = crd_on_bert()
    banks = distiller.bank_student.clone(), distiller.bank_teacher.clone()
    for view in views:
        view.model.eval()
    assert distiller(*views, batch).item() == 0.0
    views[0].model.train()
    assert distiller(*views, {k: v for k, v in batch.items() if k != SAMPLE_INDEX}).item() == 0.0
    assert torch.equal(distiller.bank_student, banks[0]) and torch.equal(distiller.bank_teacher, banks[1])


# ---- in the trainer -------------------------------------------------------------------------------------------------
class Recorder:
    """What the distiller and the models received in every training forward."""

    def __init__(self, trainer):
        self.calls, self.model_kwargs = [], []
        distiller = trainer.distillers[0]
        distiller.register_forward_pre_hook(self.before)
        distiller.register_forward_hook(self.after)
        for model in (trainer.model, trainer.teacher):
            model.register_forward_pre_hook(lambda m, args, kwargs: self.model_kwargs.append(set(kwargs)),
                                            with_kwargs=True)

    def before(self, distiller, args):
        self.calls.append({"banks": {r: getattr(distiller, f"bank_{r}").clone() for r in ("student", "teacher")},
                           "views": args[:2], "batch": dict(args[2])})

    def after(self, distiller, args, output):
        self.calls[-1]["after"] = {r: getattr(distiller, f"bank_{r}").clone() for r in ("student", "teacher")}


def crd_trainer(output_dir, data, **overrides):
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                                  train_dataset=data, distillers=[{"name": "crd", "nce_k": 4, "feat_dim": 8}],
                                  args=training_args(output_dir, seed=0, logging_steps=1, **overrides))
    return trainer, Recorder(trainer)


def test_one_step_updates_the_batch_rows_of_both_banks_with_momentum(tmp_path):
    trainer, recorder = crd_trainer(tmp_path, text_classification_data(n=8), max_steps=1, learning_rate=0.0)
    trainer.train()
    (call,) = recorder.calls
    index = call["batch"][SAMPLE_INDEX]
    distiller = trainer.distillers[0]
    g_s, g_t = (g.float() for g in projected(distiller, [v.detached() for v in call["views"]]))
    others = torch.ones(8, dtype=torch.bool)
    others[index] = False
    for role, g in (("student", g_s), ("teacher", g_t)):
        old, new = call["banks"][role], getattr(distiller, f"bank_{role}")
        torch.testing.assert_close(new[index], F.normalize(0.5 * old[index] + 0.5 * g, dim=1))
        assert torch.equal(new[others], old[others])


class ListDataset(torch.utils.data.Dataset):
    """A plain torch dataset of dicts (not a ``datasets.Dataset``)."""

    def __init__(self, data):
        self.rows = [dict(zip(data.column_names, values)) for values in zip(*(data[c] for c in data.column_names))]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


@pytest.mark.parametrize("kind", ["datasets", "torch"])
def test_the_index_reaches_the_distiller_under_shuffling_and_never_the_models(kind, tmp_path):
    data = text_classification_data(n=8)
    trainer, recorder = crd_trainer(tmp_path, data if kind == "datasets" else ListDataset(data), max_steps=4)
    trainer.train()
    assert SAMPLE_INDEX not in data.column_names  # the user's dataset is unchanged
    orders = [call["batch"][SAMPLE_INDEX].tolist() for call in recorder.calls]
    assert sorted(orders[0] + orders[1]) == sorted(orders[2] + orders[3]) == list(range(8))  # two epochs
    assert sum(orders, []) != list(range(8)) * 2  # shuffled
    for call in recorder.calls:  # the index is the sample's position in the dataset
        expected = torch.tensor([data[i]["input_ids"] for i in call["batch"][SAMPLE_INDEX].tolist()])
        assert torch.equal(call["batch"]["input_ids"], expected)
    assert recorder.model_kwargs and all(SAMPLE_INDEX not in kwargs for kwargs in recorder.model_kwargs)


def test_a_dataset_without_length_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['crd'\] keep state per training sample"):
        crd_trainer(tmp_path, None, max_steps=1)


def test_resume_from_a_checkpoint_repeats_the_uninterrupted_run_exactly(tmp_path):
    def run(output_dir, resume=None):
        args = DistillationArguments(
            output_dir=output_dir, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, max_steps=4,
            save_strategy="steps", save_steps=2, logging_steps=1, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2)
        trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2), args=args,
                                      train_dataset=text_classification_data(n=12),
                                      distillers=[{"name": "crd", "nce_k": 5, "feat_dim": 8}])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    reference = run(str(tmp_path / "a"))
    resumed = run(str(tmp_path / "b"), resume=str(tmp_path / "a" / "checkpoint-2"))
    for name, value in reference.distillers.state_dict().items():  # banks, Z and the embedding heads
        torch.testing.assert_close(resumed.distillers.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert reference.distillers[0].z_teacher_bank.item() > 0
    for name, value in reference.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], value, rtol=0, atol=0, msg=name)


def test_the_export_holds_only_the_student(tmp_path):
    trainer, _ = crd_trainer(tmp_path / "run", text_classification_data(n=8), max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "export"))
    trainer.model.save_pretrained(str(tmp_path / "plain"))
    exported, plain = (load_file(str(tmp_path / folder / "model.safetensors")) for folder in ("export", "plain"))
    assert exported.keys() == plain.keys()
    assert all(torch.equal(exported[key], value) for key, value in plain.items())
    assert not any("bank" in key or "embed_" in key for key in exported)


def test_crd_inside_a_composite_gets_the_index_and_the_dataset_size(tmp_path):
    composite = {"name": "composite", "components": {"crd": {"name": "crd", "nce_k": 4, "feat_dim": 8},
                                                     "kl": {"name": "kl"}}}
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                                  train_dataset=text_classification_data(n=8), distillers=[composite],
                                  args=training_args(tmp_path, seed=0, logging_steps=1, max_steps=1))
    crd = trainer.distillers[0].components["crd"]
    assert trainer.distillers[0].needs_sample_index and crd.bank_student.shape == (8, 8)
    trainer.train()
    assert crd.z_teacher_bank.item() > 0 and trainer.state.log_history[0]["loss/composite/crd"] > 0

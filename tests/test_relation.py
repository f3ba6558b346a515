"""Relation distillers (``rkd``, ``sp``, ``pkt``; every distiller of the relation family for the training checks):
each loss re-derived by hand on small tensors, their invariances, the embeddings they read, the batch-level
weighting, and short runs on BERT, ViT and Llama pairs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils.data import SequentialSampler

from conftest import EAGER, bert, image_data, llama, lm_data, text_classification_data, training_args, vit
from hf_kd import DistillationTrainer, ModelView, build_distiller
from hf_kd.distillers.base import _REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

RELATIONS = sorted(name for name, cls in _REGISTRY.items() if cls.__module__.startswith("hf_kd.") and
                   cls.family == "relation")
BATCH_RELATIONS = ["pkt", "rkd", "sp"]  # the ones defined on an embedding per sample (and on the batch alone)
EMBEDDING_RELATIONS = [*BATCH_RELATIONS, "crd"]  # crd also reads one embedding per sample, against a memory bank


def embeddings(seed: int, rows: int = 5, width: int = 4) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def huber(a: float, b: float) -> float:
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


# ---- each loss, by hand --------------------------------------------------------------------------------------
def rkd_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    n = len(s)

    def distances(x):
        d = [[math.dist(x[i].tolist(), x[j].tolist()) for j in range(n)] for i in range(n)]
        nonzero = [v for row in d for v in row if v > 0]
        mu = sum(nonzero) / len(nonzero)
        return [[v / mu for v in row] for row in d]

    def angle(x, i, j, k):  # at e_j, between e_i and e_k
        u, v = x[i] - x[j], x[k] - x[j]
        nu, nv = u.norm().item(), v.norm().item()
        return 0.0 if nu == 0 or nv == 0 else float(u @ v) / (max(nu, 1e-12) * max(nv, 1e-12))

    ds, dt = distances(s), distances(t)
    distance = sum(huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / n**2
    angles = sum(huber(angle(s, i, j, k), angle(t, i, j, k)) for i, j, k in itertools.product(range(n), repeat=3))
    return 25 * distance + 50 * angles / n**3


def sp_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    def gram(x):
        g = [[float(x[i] @ x[j]) for j in range(len(x))] for i in range(len(x))]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in g]

    gs, gt = gram(s), gram(t)
    return sum((a - b) ** 2 for ra, rb in zip(gs, gt) for a, b in zip(ra, rb)) / len(s) ** 2


def pkt_by_hand(s: torch.Tensor, t: torch.Tensor) -> float:
    def probabilities(x):
        k = [[(float(x[i] @ x[j]) / (x[i].norm() * x[j].norm()).item() + 1) / 2 for j in range(len(x))]
             for i in range(len(x))]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probabilities(s), probabilities(t)
    eps = 1e-7
    return sum(b * math.log((b + eps) / (a + eps)) for ra, rb in zip(ps, pt) for a, b in zip(ra, rb)) / len(s) ** 2


BY_HAND = {"rkd": rkd_by_hand, "sp": sp_by_hand, "pkt": pkt_by_hand}


def relation_loss(name: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    loss = build_distiller({"name": name}).relation_loss(student, teacher)
    return loss[0] if isinstance(loss, tuple) else loss


@pytest.mark.parametrize("name", BATCH_RELATIONS)
def test_loss_equals_the_definition_computed_by_hand(name):
    s, t = embeddings(0), embeddings(1, width=6)  # widths may differ: the relations are B x B
    assert relation_loss(name, s, t).item() == pytest.approx(BY_HAND[name](s, t), rel=1e-9, abs=1e-12)


# ---- invariances -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BATCH_RELATIONS)
def test_the_loss_does_not_depend_on_the_order_of_the_samples(name):
    s, t = embeddings(0), embeddings(1, width=6)
    order = torch.tensor([3, 0, 4, 1, 2])
    assert relation_loss(name, s[order], t[order]).item() == pytest.approx(relation_loss(name, s, t).item(), rel=1e-9)


def test_rkd_is_invariant_to_rotating_and_translating_the_student_space():
    s, t = embeddings(0), embeddings(1, width=6)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    moved = s @ rotation + torch.tensor([5.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    distiller = build_distiller({"name": "rkd"})
    before, after = distiller.relation_loss(s, t)[1], distiller.relation_loss(moved, t)[1]
    assert after["distance"].item() == pytest.approx(before["distance"].item(), rel=1e-9)
    assert after["angle"].item() == pytest.approx(before["angle"].item(), rel=1e-9)


def test_rkd_distance_ignores_a_global_scale_of_either_space():
    s, t = embeddings(0), embeddings(1)
    distiller = build_distiller({"name": "rkd"})
    assert distiller.relation_loss(3.0 * s, t)[1]["distance"].item() == pytest.approx(
        distiller.relation_loss(s, t)[1]["distance"].item(), rel=1e-9)


@pytest.mark.parametrize("name", BATCH_RELATIONS)
def test_equal_embeddings_give_zero_loss_and_zero_gradient(name):
    t = embeddings(1)
    s = t.clone().requires_grad_(True)
    loss = relation_loss(name, s, t)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-9)
    assert s.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", BATCH_RELATIONS)
def test_different_embeddings_give_a_positive_loss_and_a_gradient(name):
    s, t = embeddings(0).requires_grad_(True), embeddings(1)
    loss = relation_loss(name, s, t)
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().max().item() > 0


# ---- the embeddings they relate --------------------------------------------------------------------------------
def bert_views(**flags):
    student, teacher = bert(seed=1), bert(layers=3, hidden=48, seed=2)
    data = text_classification_data(n=6)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    views = []
    for model in (student, teacher):
        out = model.eval()(**batch, output_hidden_states=True)
        views.append(ModelView(model=model, task="classification", logits=out.logits, hidden_states=out.hidden_states))
    return student, teacher, views, batch


@pytest.mark.parametrize("embedding", ["cls", "mean", "last_token", "logits"])
def test_pooled_embeddings_are_the_documented_tokens(embedding):
    student, teacher, (view, _), batch = bert_views()
    distiller = build_distiller({"name": "sp", "embedding": embedding, "layer": 1})
    distiller.setup(student, teacher)
    got = distiller.embeddings(view, batch, "student")
    hidden, mask = view.hidden_states[1], batch["attention_mask"]
    rows = []
    for b in range(len(mask)):
        valid = mask[b].nonzero().flatten()
        rows.append({"cls": hidden[b, 0], "mean": hidden[b, valid].mean(0), "last_token": hidden[b, valid[-1]],
                     "logits": view.logits[b]}[embedding])
    torch.testing.assert_close(got, torch.stack(rows).float())


def test_last_token_reads_the_last_non_padding_token_with_left_padding():
    student, teacher, (view, _), batch = bert_views()
    left = {"attention_mask": batch["attention_mask"].flip(1)}  # the same rows padded on the left
    distiller = build_distiller({"name": "rkd", "embedding": "last_token"})
    distiller.setup(student, teacher)
    torch.testing.assert_close(distiller.embeddings(view, left, "student"), view.hidden_states[-1][:, -1].float())


def test_pooler_and_module_path_embeddings_come_from_the_feature_hooks(tmp_path):
    for embedding in ("pooler", "bert.encoder.layer.1.output"):
        distiller = build_distiller({"name": "pkt", "embedding": embedding})
        trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                                      args=training_args(tmp_path, max_steps=1, logging_steps=1),
                                      train_dataset=text_classification_data(n=8), distillers=[distiller])
        assert distiller.student_features() and distiller.teacher_features()
        trainer.train()
        assert math.isfinite(trainer.state.log_history[0]["loss/pkt"])
        assert trainer.state.log_history[0]["loss/pkt"] > 0


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "rkd", "embedding": ""}, "`embedding` is one of cls, mean, last_token, pooler, logits"),
    ({"name": "rkd", "embedding": {"student": "a"}}, "names both modules"),
    ({"name": "pkt", "layers": {1: 2}, "embedding": "pooler"}, "needs a pooled `embedding`"),
    ({"name": "rkd", "distance_weight": -1.0}, "must be >= 0"),
])
def test_bad_options_are_refused_when_built(spec, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_distiller(spec)


@pytest.mark.parametrize("spec, fragment", [
    ({"name": "sp", "layer": 7}, r"`layer`=7 is not a hidden state of the student"),
    ({"name": "sp", "embedding": "bert.encoder.layer.9"}, "has no submodule 'bert.encoder.layer.9'"),
    ({"name": "pkt", "layers": {1: 9}}, "`layers` entry 1 -> 9 is out of range"),
])
def test_bad_layers_and_modules_are_refused_before_training(spec, fragment, tmp_path):
    with pytest.raises(ValueError, match=fragment):
        DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, seed=2),
                            args=training_args(tmp_path, max_steps=1), distillers=[spec])


# ---- information flow: PKT at several layer pairs ----------------------------------------------------------------
def test_information_flow_weights_intermediate_pairs_by_their_schedule():
    student, teacher, (s_view, t_view), batch = bert_views()
    schedule = {"schedule": "step", "start": 100.0, "gamma": 0.7, "milestones": [2, 4]}
    distiller = build_distiller({"name": "pkt", "layers": {1: 1, 2: 3}, "intermediate_weight": schedule})
    distiller.setup(student, teacher)
    for step, factor in ((0, 100.0), (2, 70.0), (5, 49.0)):
        distiller.set_progress(step, 10)
        loss, parts = distiller(s_view, t_view, batch)
        assert loss.item() == pytest.approx(factor * parts["layer_1"].item() + parts["layer_2"].item(), rel=1e-5)
    pooled = [view.hidden_states[layer][:, 0].detach() for view, layer in ((s_view, 1), (t_view, 1))]
    assert parts["layer_1"].item() == pytest.approx(pkt_by_hand(*(p.double() for p in pooled)), rel=1e-4)


# ---- the batch-level rule ------------------------------------------------------------------------------------------
class InOrder(DistillationTrainer):
    """Micro-batches in dataset order, so the test knows which samples each one relates."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


@pytest.mark.parametrize("name", BATCH_RELATIONS)
def test_each_micro_batch_relates_its_own_samples_weighted_by_its_share(name, tmp_path):
    data = text_classification_data(n=8)
    student, teacher = bert(seed=1), bert(layers=3, hidden=48, seed=2)
    spec = {"name": name, "embedding": "mean"}
    expected = 0.0
    for rows in (range(0, 4), range(4, 8)):  # two micro-batches of 4, each half of the step's 8 samples
        batch = {k: torch.tensor(data[list(rows)][k]) for k in ("input_ids", "attention_mask")}
        views = [ModelView(model=m, task="classification", hidden_states=m(**batch, output_hidden_states=True)
                           .hidden_states) for m in (student, teacher)]
        loss = relation_loss_of_views(build_distiller(spec), student, teacher, views, batch)
        expected += 0.5 * loss
    trainer = InOrder(model=student, teacher_model=teacher, train_dataset=data, distillers=[spec],
                      args=training_args(tmp_path, max_steps=1, logging_steps=1, gradient_accumulation_steps=2,
                                         hard_label_weight=0.0, learning_rate=0.0))
    trainer.train()
    assert trainer.state.log_history[0][f"loss/{name}"] == pytest.approx(expected, rel=1e-5)


def relation_loss_of_views(distiller, student, teacher, views, batch) -> float:
    distiller.setup(student, teacher)
    with torch.no_grad():
        loss = distiller(*views, batch)
    return (loss[0] if isinstance(loss, tuple) else loss).item()


# ---- every relation distiller trains text, image and causal-LM pairs --------------------------------------------
PAIRS = {
    "bert": lambda: (bert(seed=1, **EAGER), bert(layers=3, hidden=48, seed=2, **EAGER), text_classification_data(n=8)),
    "vit": lambda: (vit(layers=1, seed=1), vit(layers=2, hidden=48, seed=2), image_data(n=8)),
    "llama": lambda: (llama(seed=1), llama(layers=3, hidden=48, seed=2), lm_data(n=8)),
}


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", RELATIONS)
def test_every_relation_distiller_trains_and_exports_only_the_student(name, pair, tmp_path):
    from safetensors.torch import load_file

    student, teacher, data = PAIRS[pair]()
    spec = {"name": name, **({"embedding": "last_token"} if pair == "llama" and name in EMBEDDING_RELATIONS else {})}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data, distillers=[spec],
                                  args=training_args(tmp_path / "run", max_steps=2, logging_steps=1))
    trainer.train()
    logged = [log[f"loss/{name}"] for log in trainer.state.log_history if f"loss/{name}" in log]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
    trainer.save_model(str(tmp_path / "export"))
    student.save_pretrained(str(tmp_path / "plain"))
    exported, plain = (load_file(str(tmp_path / folder / "model.safetensors")) for folder in ("export", "plain"))
    assert exported.keys() == plain.keys()
    assert all(torch.equal(exported[key], value) for key, value in plain.items())

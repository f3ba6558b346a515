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
EMBEDDING_RELATIONS = [*BATCH_RELATIONS, "anchor_relation", "crd", "topology"]  # one embedding per sample each


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


# ---- anchor_relation, fsp, topology -----------------------------------------------------------------------------
def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / (a.norm() * b.norm()).item()


def test_anchor_relation_over_the_batch_by_hand():
    s, t = embeddings(0), embeddings(1, width=6)
    tau = 0.5
    loss = build_distiller({"name": "anchor_relation", "temperature": tau}).relation_loss(s, t)
    n = len(s)
    expected = sum(kl(softmax([cosine(t[i], t[j]) / tau for j in range(n) if j != i]),
                      softmax([cosine(s[i], s[j]) / tau for j in range(n) if j != i])) for i in range(n)) / n
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_anchor_relation_over_the_teacher_classes_by_hand():
    student, teacher, (s_view, t_view), batch = bert_views()
    distiller = build_distiller({"name": "anchor_relation", "anchors": "classifier", "embedding": "cls",
                                 "temperature": 0.5})
    distiller.setup(student, teacher)
    rows = teacher.classifier.weight.detach().double()
    e_s = distiller.projector(s_view.hidden_states[-1][:, 0]).detach().double()
    e_t = t_view.hidden_states[-1][:, 0].detach().double()
    expected = sum(kl(softmax([cosine(e_t[i], r) / 0.5 for r in rows]),
                      softmax([cosine(e_s[i], r) / 0.5 for r in rows])) for i in range(len(e_s))) / len(e_s)
    assert distiller(s_view, t_view, batch).item() == pytest.approx(expected, rel=1e-4)


def test_anchor_relation_refuses_an_embedding_the_classifier_does_not_read(tmp_path):
    with pytest.raises(ValueError, match="the embedding must be what the classifier reads"):
        DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                            args=training_args(tmp_path, max_steps=1),
                            distillers=[{"name": "anchor_relation", "anchors": "classifier", "embedding": "logits"}])


def test_learned_anchors_train_with_the_student_and_stay_out_of_the_export(tmp_path):
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                                  train_dataset=text_classification_data(n=8),
                                  args=training_args(tmp_path, max_steps=2, learning_rate=1e-2),
                                  distillers=[{"name": "anchor_relation", "anchors": "learned", "num_anchors": 5}])
    before = trainer.distillers[0].learned.detach().clone()
    trainer.train()
    assert before.shape == (5, 48) and not torch.equal(before, trainer.distillers[0].learned.detach())


def test_fsp_matrix_is_the_mean_outer_product_over_valid_positions():
    a, b = embeddings(0, rows=6).view(2, 3, 4), embeddings(1, rows=6, width=2).view(2, 3, 2)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    from hf_kd.distillers.fsp import fsp_matrix

    got = fsp_matrix(a, b, mask)
    for sample, n in ((0, 2), (1, 3)):
        expected = sum(torch.outer(a[sample, i], b[sample, i]) for i in range(n)) / n
        torch.testing.assert_close(got[sample], expected)


def test_fsp_is_zero_when_the_student_is_the_teacher():
    student, _, (s_view, _), batch = bert_views()
    distiller = build_distiller({"name": "fsp", "layers": {1: 1, 2: 2}})
    distiller.setup(student, student)  # same widths: no projector
    loss, parts = distiller(s_view, s_view, batch)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and parts["fsp"].item() == pytest.approx(0.0, abs=1e-9)


def test_fsp_by_hand_on_two_layers():
    student, teacher, (s_view, t_view), batch = bert_views()
    distiller = build_distiller({"name": "fsp", "layers": {1: 1, 2: 3}, "normalize": False, "projector": "linear"})
    distiller.setup(student, teacher)
    mask = batch["attention_mask"].double()
    h_s = [distiller.projectors[str(s)](s_view.hidden_states[s]).detach().double() for s in (1, 2)]
    h_t = [t_view.hidden_states[t].detach().double() for t in (1, 3)]
    fsp, cos, tokens = 0.0, 0.0, mask.sum().item()
    for b in range(len(mask)):
        valid = mask[b].nonzero().flatten()
        g_s = sum(torch.outer(h_s[0][b, i], h_s[1][b, i]) for i in valid) / len(valid)
        g_t = sum(torch.outer(h_t[0][b, i], h_t[1][b, i]) for i in valid) / len(valid)
        fsp += (g_s - g_t).pow(2).mean().item() / len(mask)
        cos += sum(1 - cosine(h_s[k][b, i], h_t[k][b, i]) for k in (0, 1) for i in valid) / (2 * tokens)
    _, parts = distiller(s_view, t_view, batch)
    assert parts["fsp"].item() == pytest.approx(fsp, rel=1e-4)
    assert parts["cosine"].item() == pytest.approx(cos, rel=1e-4)


def test_topology_loss_by_hand():
    from hf_kd.distillers.topology import topology_loss

    s, t = embeddings(0), embeddings(1, width=6)
    groups = torch.tensor([0, 1, 0, 1, 1])
    entity, group = topology_loss(s, t, groups, 3)
    pairs = [(i, j) for i in range(5) for j in range(5) if groups[i] == groups[j]]
    assert entity.item() == pytest.approx(
        sum((cosine(s[i], s[j]) - cosine(t[i], t[j])) ** 2 for i, j in pairs) / len(pairs), rel=1e-9)
    prototypes = [(s[groups == k].mean(0), t[groups == k].mean(0)) for k in (0, 1)]
    assert group.item() == pytest.approx(sum((cosine(p_s, s[i]) - cosine(p_t, t[i])) ** 2 for p_s, p_t in prototypes
                                             for i in range(5)) / 10, rel=1e-9)
    full, _ = topology_loss(s, t, None, 1)
    assert full.item() == pytest.approx(sum((cosine(s[i], s[j]) - cosine(t[i], t[j])) ** 2 for i in range(5)
                                            for j in range(5)) / 25, rel=1e-9)
    assert topology_loss(t, t, groups, 3)[0].item() == pytest.approx(0.0, abs=1e-12)


def test_topology_trains_its_assignment_and_experts_and_draws_the_same_on_a_rerun(tmp_path):
    def run():
        trainer = DistillationTrainer(model=bert(seed=1), teacher_model=bert(layers=3, hidden=48, seed=2),
                                      train_dataset=text_classification_data(n=8),
                                      args=training_args(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-2),
                                      distillers=[{"name": "topology", "num_groups": 2, "seed": 3}])
        before = {n: p.detach().clone() for n, p in trainer.distillers.named_parameters()}
        trainer.train()
        moved = {n for n, p in trainer.distillers.named_parameters() if not torch.equal(before[n], p)}
        return moved, trainer.state.log_history[1]["loss/topology/assignment"]

    (moved, logged), (_, again) = run(), run()
    assert any(n.startswith("0.assignment") for n in moved) and any(n.startswith("0.experts") for n in moved)
    assert logged == again

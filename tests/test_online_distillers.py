"""Online distillers (hf_kd.distillers.bdkd, .dualde, .peers): bdkd, dualde, mutual, p2p.

Losses are checked against hand computations on tiny logits; the trainer runs check which parameters learn.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, TrainerCallback

from conftest import bert, image_data, text_classification_data, vit
from hf_kd import DistillationArguments, DistillationTrainer, ModelView, build_distiller
from hf_kd.distillers.bdkd import BDKDDistiller, entropy_weighting
from hf_kd.distillers.dualde import DualDEDistiller
from hf_kd.distillers.mutual import MutualLearningDistiller, PeerToPeerDistiller
from hf_kd.trainer import DISTILLER_STATE_NAME, TEACHER_STATE_NAME

Z_S = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
Z_T = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 3.0]])
LABELS = torch.tensor([1, 2])


def view(logits):
    return ModelView(model=torch.nn.Identity(), task="classification", logits=logits)


def probs(z):  # by hand, no library softmax
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kl(p, q):  # KL(p || q) per row
    return (p * (p / q).log()).sum(-1)


def entropy(p):
    return -(p * p.log()).sum(-1)


def ce(z, y):
    return -probs(z)[torch.arange(len(y)), y].log()


def args(output_dir, **overrides):
    return DistillationArguments(**{
        "output_dir": str(output_dir), "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no",
        "per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 2, "learning_rate": 1e-2, **overrides})


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model):
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}


def logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


# ---- bdkd --------------------------------------------------------------------------------------------------------
def test_bdkd_entropy_weight_by_hand():
    # student uniform over 2 classes: H = ln 2; teacher p = [1/4, 3/4]: H = -(1/4 ln 1/4 + 3/4 ln 3/4)
    w = entropy_weighting(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, math.log(3.0)]]))
    h_t = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert w.item() == pytest.approx(math.log(2) / (math.log(2) + h_t), rel=1e-6)
    assert w.item() == pytest.approx(0.55214, abs=1e-4)


def test_bdkd_loss_matches_hand_computation():
    t = 2.0
    d = BDKDDistiller(temperature=t)
    loss, parts = d(view(Z_S), view(Z_T), {})
    p_s, p_t = probs(Z_S), probs(Z_T)
    w_r = entropy(p_s) / (entropy(p_s) + entropy(p_t))
    ps_t, pt_t = probs(Z_S / t), probs(Z_T / t)
    expected = t * t * ((1 - w_r) * kl(pt_t, ps_t) + w_r * kl(ps_t, pt_t)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(parts["w_reverse"], w_r.mean())
    assert "teacher" not in parts and d.teacher_parameters() == []
    assert not d.teacher_train_mode and not d.requires.labels
    online = BDKDDistiller(online_teacher=True)
    assert online.teacher_train_mode and online.requires.labels  # DML-style teacher: dropout on while it learns


def test_bdkd_weighting_by_name_or_callable():
    t = 1.5
    ps_t, pt_t = probs(Z_S / t), probs(Z_T / t)
    forward = BDKDDistiller(temperature=t, weighting="forward")(view(Z_S), view(Z_T), {})[0]
    torch.testing.assert_close(forward, t * t * kl(pt_t, ps_t).mean())
    reverse = build_distiller({"name": "bdkd", "temperature": t, "weighting": "reverse"})(view(Z_S), view(Z_T), {})[0]
    torch.testing.assert_close(reverse, t * t * kl(ps_t, pt_t).mean())
    custom = BDKDDistiller(temperature=t, weighting=lambda s, te: torch.tensor([0.0, 1.0]))(view(Z_S), view(Z_T), {})
    torch.testing.assert_close(custom[0], t * t * (kl(pt_t, ps_t)[0] + kl(ps_t, pt_t)[1]) / 2)
    with pytest.raises(ValueError, match="unknown `weighting`"):
        BDKDDistiller(weighting="nope")


def test_bdkd_online_teacher_gradients_split_by_side():
    t = 2.0
    z_s, z_t = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    loss, parts = BDKDDistiller(temperature=t, online_teacher=True)(view(z_s), view(z_t), {"labels": LABELS})
    grad_s, grad_t = torch.autograd.grad(loss, (z_s, z_t))

    hs, ht = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    w_r = (entropy(probs(Z_S)) / (entropy(probs(Z_S)) + entropy(probs(Z_T))))
    student = t * t * ((1 - w_r) * kl(probs(Z_T / t), probs(hs / t)) + w_r * kl(probs(hs / t), probs(Z_T / t))).mean()
    teacher = ce(ht, LABELS).mean() + t * t * kl(probs(Z_S / t), probs(ht / t)).mean()
    torch.testing.assert_close(grad_s, torch.autograd.grad(student, hs)[0])
    torch.testing.assert_close(grad_t, torch.autograd.grad(teacher, ht)[0])
    torch.testing.assert_close(parts["student"], student.detach())
    torch.testing.assert_close(parts["teacher"], teacher.detach())
    torch.testing.assert_close(loss, student + teacher)


def test_bdkd_in_trainer_frozen_teacher_untouched(tmp_path):
    teacher = bert(layers=3, seed=2)
    before = snapshot(teacher)
    trainer = DistillationTrainer(model=bert(seed=1), teacher_model=teacher, args=args(tmp_path),
                                  train_dataset=text_classification_data(), distillers=[{"name": "bdkd"}])
    trainer.train()
    assert changed(before, teacher) == set()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {"loss/bdkd", "loss/bdkd/student", "loss/bdkd/w_reverse"} <= set(logged(trainer)[-1])


def test_bdkd_online_teacher_learns_in_trainer(tmp_path):
    teacher = bert(layers=3, seed=2)
    before = snapshot(teacher)
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=teacher, args=args(tmp_path, teacher_learning_rate=5e-2),
        train_dataset=text_classification_data(),
        distillers=[{"name": "bdkd", "temperature": 2.0, "online_teacher": True, "teacher_modules": ["classifier"]}])
    trainer.train()
    assert changed(before, teacher) == {"classifier.weight", "classifier.bias"}
    assert trainer.optimizer.param_groups[-1]["initial_lr"] == 5e-2
    assert {"loss/bdkd/student", "loss/bdkd/teacher"} <= set(logged(trainer)[-1])

    whole = bert(layers=3, seed=2)
    DistillationTrainer(model=bert(seed=1), teacher_model=whole, args=args(tmp_path / "b"),
                        train_dataset=text_classification_data(),
                        distillers=[{"name": "bdkd", "online_teacher": True}]).train()
    assert "bert.encoder.layer.0.attention.self.query.weight" in changed(before, whole)


# ---- dualde ------------------------------------------------------------------------------------------------------
def test_dualde_weight_by_hand():
    d = DualDEDistiller(beta=4.0, c=0.5)
    w = d.confidence_weight(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1]))  # p_t[y] = 3/4
    assert w.item() == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)  # sigmoid(4 * 0.25)


def test_dualde_loss_and_stage_switch_by_global_step():
    t, beta, c = 2.0, 3.0, 0.4
    d = DualDEDistiller(temperature=t, beta=beta, c=c, stage2_step=3)
    rows = torch.arange(2)
    w = torch.sigmoid(beta * (probs(Z_T)[rows, LABELS] - c))
    v = torch.sigmoid(beta * (probs(Z_S)[rows, LABELS] - c))
    hs, ht = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
    student = (w * t * t * kl(probs(Z_T / t), probs(hs / t)) + (1 - w) * ce(hs, LABELS)).mean()
    teacher = (v * t * t * kl(probs(Z_S / t), probs(ht / t)) + (1 - v) * ce(ht, LABELS)).mean()

    for step, stage in ((0, 1), (2, 1), (3, 2), (7, 2)):
        d.set_progress(step, 10)
        assert d.stage == stage
        z_s, z_t = Z_S.clone().requires_grad_(), Z_T.clone().requires_grad_()
        loss, parts = d(view(z_s), view(z_t), {"labels": LABELS})
        torch.testing.assert_close(parts["student"], student.detach())
        torch.testing.assert_close(parts["w"], w.mean())
        loss.backward()
        torch.testing.assert_close(z_s.grad, torch.autograd.grad(student, hs, retain_graph=True)[0])
        if stage == 1:
            assert z_t.grad is None and "teacher" not in parts
            torch.testing.assert_close(loss, student.detach())
        else:
            torch.testing.assert_close(z_t.grad, torch.autograd.grad(teacher, ht, retain_graph=True)[0])
            torch.testing.assert_close(parts["teacher"], teacher.detach())
    assert DualDEDistiller(stage2_step=None).stage == 1


class TeacherSnapshots(TrainerCallback):
    def __init__(self, teacher):
        self.teacher, self.states = teacher, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.states[state.global_step] = snapshot(self.teacher)


def test_dualde_teacher_frozen_in_stage_1_learns_in_stage_2(tmp_path):
    teacher = bert(layers=3, seed=2)
    before = snapshot(teacher)
    snapshots = TeacherSnapshots(teacher)
    trainer = DistillationTrainer(
        model=bert(seed=1), teacher_model=teacher,
        args=args(tmp_path, max_steps=4, hard_label_weight=0.0, weight_decay=0.1),
        train_dataset=text_classification_data(), callbacks=[snapshots],
        distillers=[{"name": "dualde", "stage2_step": 2, "teacher_modules": ["classifier"]}])
    trainer.train()
    for step in (1, 2):  # the steps taken at global_step 0 and 1: stage 1
        assert all(torch.equal(before[n], p) for n, p in snapshots.states[step].items()), step
    assert {n for n, p in snapshots.states[3].items() if not torch.equal(before[n], p)} == {
        "classifier.weight", "classifier.bias"}
    logs = {h["step"]: h for h in logged(trainer)}
    assert "loss/dualde/teacher" not in logs[2] and "loss/dualde/teacher" in logs[3]
    assert {"loss/dualde", "loss/dualde/soft", "loss/dualde/hard", "loss/dualde/w"} <= set(logs[1])
    assert "loss/hard" not in logs[1]  # hard_label_weight=0: the hard term lives inside dualde


def test_dualde_bad_teacher_module():
    with pytest.raises(ValueError, match="no submodule 'head'"):
        DualDEDistiller(stage2_step=1, teacher_modules=["head"]).setup(bert(), bert())


# ---- mutual / p2p ------------------------------------------------------------------------------------------------
Z_P = [torch.tensor([[0.0, 1.0, -1.0], [1.0, 1.0, 0.0]]), torch.tensor([[-1.0, 0.5, 0.5], [2.0, 0.0, 0.0]])]


def fixed_peers(distiller, peers):
    distiller.peer_logits = lambda batch, training: peers
    return distiller


def test_mutual_loss_and_gradients_by_hand():
    z_s = Z_S.clone().requires_grad_()
    z_p = [z.clone().requires_grad_() for z in Z_P]
    d = fixed_peers(MutualLearningDistiller(num_peers=2), z_p)
    loss, parts = d(view(z_s), None, {"labels": LABELS})
    p = [probs(Z_S), probs(Z_P[0]), probs(Z_P[1])]
    student = (kl(p[1], p[0]) + kl(p[2], p[0])).mean() / 2
    peer0 = ce(Z_P[0], LABELS).mean() + ((kl(p[0], p[1]) + kl(p[2], p[1])) / 2).mean()
    peer1 = ce(Z_P[1], LABELS).mean() + ((kl(p[0], p[2]) + kl(p[1], p[2])) / 2).mean()
    torch.testing.assert_close(parts["student"], student)
    torch.testing.assert_close(parts["peer_0"], peer0)
    torch.testing.assert_close(parts["peer_1"], peer1)
    torch.testing.assert_close(loss, student + peer0 + peer1)
    assert parts["peer_0_accuracy"].item() == 0.5  # argmax [1, 0] vs labels [1, 2]

    grads = torch.autograd.grad(loss, (z_s, *z_p))  # each model's gradient comes from its own term only
    hs = Z_S.clone().requires_grad_()
    own = (kl(p[1], probs(hs)) + kl(p[2], probs(hs))).mean() / 2
    torch.testing.assert_close(grads[0], torch.autograd.grad(own, hs)[0])
    hp = Z_P[0].clone().requires_grad_()
    own = ce(hp, LABELS).mean() + ((kl(p[0], probs(hp)) + kl(p[2], probs(hp))) / 2).mean()
    torch.testing.assert_close(grads[1], torch.autograd.grad(own, hp)[0])


def test_p2p_loss_by_hand():
    tt = 3.0
    d = fixed_peers(PeerToPeerDistiller(teacher_temperature=tt), [Z_P[0]])
    loss, parts = d(view(Z_S), view(Z_T), {"labels": LABELS})
    p_s, p_p = probs(Z_S), probs(Z_P[0])
    student = tt * tt * kl(probs(Z_T / tt), probs(Z_S / tt)).mean() + kl(p_p, p_s).mean()
    peer = ce(Z_P[0], LABELS).mean() + tt * tt * kl(probs(Z_T / tt), probs(Z_P[0] / tt)).mean() + kl(p_s, p_p).mean()
    torch.testing.assert_close(parts["student"], student)
    torch.testing.assert_close(parts["peer_0"], peer)
    torch.testing.assert_close(loss, student + peer)


def test_peer_initialisation():
    student = bert(seed=1)
    copies = MutualLearningDistiller(num_peers=2, init="student")
    copies.setup(student, None)
    for peer in copies.peers:
        assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), peer.state_dict().values()))
    a, b = MutualLearningDistiller(seed=5), MutualLearningDistiller(seed=5)
    a.setup(student, None), b.setup(student, None)
    wa, wb = a.peers[0].classifier.weight, b.peers[0].classifier.weight
    assert torch.equal(wa, wb) and not torch.equal(wa, student.classifier.weight)


def test_mutual_trains_peers_without_teacher_checkpoints_and_exports_them(tmp_path):
    trainer = DistillationTrainer(
        model=bert(seed=1), args=args(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=text_classification_data(), distillers=[{"name": "mutual", "num_peers": 2, "seed": 0}])
    distiller = trainer.distillers[0]
    before = [snapshot(peer) for peer in distiller.peers]
    trainer.train()
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for peer, old in zip(distiller.peers, before):
        assert all(id(p) in in_optimizer for p in peer.parameters())
        assert {"classifier.weight", "bert.embeddings.word_embeddings.weight"} <= changed(old, peer)
    last = logged(trainer)[-1]
    assert {"loss/hard", "loss/mutual", "loss/mutual/student", "loss/mutual/peer_0", "loss/mutual/peer_1"} <= set(last)

    saved = torch.load(tmp_path / "checkpoint-2" / DISTILLER_STATE_NAME)
    torch.testing.assert_close(saved["0.peers.1.classifier.weight"], distiller.peers[1].classifier.weight)
    assert not (tmp_path / "checkpoint-2" / TEACHER_STATE_NAME).exists()

    folders = distiller.save_peers(tmp_path / "peers")
    assert [f.rsplit("/", 1)[-1] for f in folders] == ["peer_0", "peer_1"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(folders[1]).eval()
    batch = {k: torch.tensor(v) for k, v in text_classification_data(n=4)[:4].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, distiller.peers[1].eval()(**batch).logits)


def test_p2p_in_trainer_on_vit_teacher_frozen_peers_learn(tmp_path):
    teacher = vit(layers=3, seed=2)
    before_teacher = snapshot(teacher)
    trainer = DistillationTrainer(model=vit(seed=1), teacher_model=teacher, args=args(tmp_path),
                                  train_dataset=image_data(), distillers=[{"name": "p2p", "seed": 0}])
    peer = trainer.distillers[0].peers[0]
    before_peer = snapshot(peer)
    trainer.train()
    assert changed(before_teacher, teacher) == set()
    assert "classifier.weight" in changed(before_peer, peer)
    assert {"loss/p2p", "loss/p2p/student", "loss/p2p/peer_0"} <= set(logged(trainer)[-1])
    metrics = trainer.evaluate(image_data(n=8))
    assert "eval_loss/p2p/peer_0" in metrics and not peer.training


def test_online_distillers_refuse_token_logits():
    lm_logits = torch.zeros(2, 5, 7)
    with pytest.raises(ValueError, match=r"classifier logits \[batch, classes\]"):
        BDKDDistiller()(view(lm_logits), view(lm_logits), {})


def test_resume_restores_peers_and_the_dualde_stage(tmp_path):
    specs = [{"name": "mutual", "seed": 0}, {"name": "dualde", "stage2_step": 2, "teacher_modules": ["classifier"]}]

    def run(folder, **overrides):
        teacher = bert(layers=3, seed=2)
        trainer = DistillationTrainer(model=bert(seed=1), teacher_model=teacher, args=args(folder, max_steps=4,
                                      **overrides), train_dataset=text_classification_data(), distillers=specs)
        return trainer, teacher

    full, full_teacher = run(tmp_path / "a", save_strategy="steps", save_steps=3)
    full.train()
    resumed, resumed_teacher = run(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert resumed.distillers[1].stage == 2
    torch.testing.assert_close(resumed_teacher.classifier.weight, full_teacher.classifier.weight)
    torch.testing.assert_close(resumed.distillers[0].peers[0].classifier.weight,
                               full.distillers[0].peers[0].classifier.weight)
    assert logged(resumed)[-1]["loss"] == pytest.approx(logged(full)[-1]["loss"], rel=1e-5)

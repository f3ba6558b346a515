"""Teacher assistants: DGKD (every guide at once, some dropped per step) and CES-KD (one routed expert per row)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import bert, llama, lm_data, text_classification_data, training_args
from hf_kd import DistillationTrainer, ModelView, build_distiller

pytestmark = pytest.mark.usefixtures("one_thread")


def kl_rows(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """``T^2 KL(p_t^T || p_s^T)`` per row, written out."""
    p_t = (teacher / t).softmax(-1)
    return t * t * (p_t * ((teacher / t).log_softmax(-1) - (student / t).log_softmax(-1))).sum(-1)


def views(logits, training=True, task="classification"):
    """One ModelView per logits tensor; the first is the student's (its module's train mode is what DGKD reads)."""
    model = nn.Linear(1, 1).train(training)
    return [ModelView(model=model, task=task, logits=z) for z in logits]


def crafted(seed=0, rows=4, classes=3, guides=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, classes, generator=g) * 2 for _ in range(guides + 1)]


# ---- DGKD --------------------------------------------------------------------------------------------------------
def test_dgkd_sums_the_kl_of_every_kept_guide():
    z_s, z_0, z_1 = crafted()
    student, g0, g1 = views([z_s, z_0, z_1])
    batch = {"labels": torch.tensor([0, 1, 2, 0])}
    both = kl_rows(z_s, z_0, 5.0).mean() + kl_rows(z_s, z_1, 5.0).mean()
    loss, parts = build_distiller({"name": "dgkd", "drop_num": 0})(student, [g0, g1], batch)
    assert loss.item() == pytest.approx(both.item(), rel=1e-5) and parts == {}
    mean = build_distiller({"name": "dgkd", "drop_num": 0, "reduction": "mean"})(student, [g0, g1], batch)[0]
    assert mean.item() == pytest.approx(both.item() / 2, rel=1e-5)

    dgkd = build_distiller({"name": "dgkd", "temperature": 2.0, "seed": 0})  # drop_num=1
    seen = set()
    for step in range(8):
        dgkd.set_progress(step, 8)
        (dropped,) = dgkd.dropped(2, step)
        loss, parts = dgkd(student, [g0, g1], batch)
        kept = z_1 if dropped == 0 else z_0
        assert loss.item() == pytest.approx(kl_rows(z_s, kept, 2.0).mean().item(), rel=1e-5)
        assert {k: v.item() for k, v in parts.items()} == {f"dropped_{k}": float(k == dropped) for k in range(2)}
        seen.add(dropped)
    assert seen == {0, 1}  # both guides get dropped over 8 steps
    student.model.eval()  # evaluation drops nothing
    assert dgkd(student, [g0, g1], batch)[0].item() == pytest.approx(
        (kl_rows(z_s, z_0, 2.0).mean() + kl_rows(z_s, z_1, 2.0).mean()).item(), rel=1e-5)


def test_dgkd_drops_a_pure_function_of_seed_and_step():
    def sets(seed, calls_per_step=1):
        dgkd = build_distiller({"name": "dgkd", "drop_num": 2, "seed": seed})
        return [[dgkd.dropped(4, step) for _ in range(calls_per_step)] for step in range(12)]

    first = sets(0, calls_per_step=3)
    assert all(len(set(map(tuple, calls))) == 1 for calls in first)  # every micro-batch of a step drops the same
    assert [calls[0] for calls in first] == [calls[0] for calls in sets(0)]  # reproducible under the seed
    assert len({tuple(calls[0]) for calls in first}) > 1  # different across steps
    assert sets(1) != sets(0)
    assert all(len(calls[0]) == 2 and set(calls[0]) <= {0, 1, 2, 3} for calls in first)


def test_dgkd_with_two_identical_guides_is_twice_kl(output_dir):
    teacher = bert(seed=2, layers=3, hidden=32)
    inputs = {k: torch.tensor(v) for k, v in text_classification_data(n=6, seed=5)[:].items()}

    def logged(teachers, spec):
        trainer = DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=teachers, distillers=[spec],
                                      args=training_args(output_dir), train_dataset=text_classification_data())
        with torch.no_grad():
            trainer.compute_loss(trainer.model.eval(), dict(inputs))
        return trainer.ledger.pop_eval(lambda v: v.reshape(1))

    kl = logged(teacher, {"name": "kl", "temperature": 3.0})["kl"]
    twins = [teacher, copy.deepcopy(teacher)]
    assert logged(twins, {"name": "dgkd", "temperature": 3.0, "drop_num": 0})["dgkd"] == pytest.approx(2 * kl, rel=1e-5)
    assert logged(twins, {"name": "dgkd", "temperature": 3.0, "drop_num": 0, "reduction": "mean"})["dgkd"] == (
        pytest.approx(kl, rel=1e-5))


def test_dgkd_on_causal_lm_rows_is_the_sum_of_kl_per_guide():
    data = lm_data(n=3)
    batch = {k: torch.tensor(v) for k, v in data[:].items()}
    models = [llama(seed=1), llama(seed=2, layers=3), llama(seed=3, hidden=48)]
    with torch.no_grad():
        outputs = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
                   for m in models]
    logits = [out.logits for out in outputs]
    student, g0, g1 = views(logits, task="causal_lm")
    kl = build_distiller({"name": "kl", "temperature": 2.0})
    expected = kl(student, g0, batch) + kl(student, g1, batch)
    dgkd = build_distiller({"name": "dgkd", "temperature": 2.0, "drop_num": 0})
    loss, _ = dgkd(student, [g0, g1], batch)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    valid = batch["labels"][:, 1:] != -100  # by hand: the mean over the predicted tokens
    by_hand = sum(kl_rows(logits[0][:, :-1][valid], z[:, :-1][valid], 2.0).mean() for z in logits[1:])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # views of the fused head path (the head's input and the head, no logits): the same loss
    fused = [ModelView(model=student.model, task="causal_lm", head_input=out.hidden_states[-1], head=m.lm_head)
             for m, out in zip(models, outputs)]
    torch.testing.assert_close(fused[0].head(fused[0].head_input), logits[0])
    assert dgkd(fused[0], fused[1:], batch)[0].item() == pytest.approx(loss.item(), rel=1e-5)


def test_dgkd_needs_fewer_drops_than_guides(output_dir):
    with pytest.raises(ValueError, match=r"`drop_num=1` must be below the number of guides.*has 1 teacher"):
        DistillationTrainer(model=bert(seed=1), teacher_model=bert(seed=2), distillers=[{"name": "dgkd"}],
                            args=training_args(output_dir), train_dataset=text_classification_data())
    dgkd = build_distiller({"name": "dgkd", "drop_num": 2})  # called without setup: the same error
    student, g0, g1 = views(crafted())
    with pytest.raises(ValueError, match=r"`drop_num=2` must be below the number of guides.*has 2 teacher"):
        dgkd(student, [g0, g1], {})


def count_forwards(models):
    """One list per model, one entry per forward pass it ran."""
    calls = [[] for _ in models]
    for model, seen in zip(models, calls):
        model.register_forward_hook(lambda module, args, output, seen=seen: seen.append(None))
    return calls


def dgkd_run(output_dir, resume=None, forwards=None):
    guides = [bert(seed=2, layers=3, hidden=32), bert(seed=3, hidden=24), bert(seed=4, hidden=16)]
    calls = count_forwards(guides)
    args = training_args(output_dir, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=1, seed=0,
                         per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3)
    trainer = DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=guides, args=args,
                                  train_dataset=text_classification_data(), distillers=[{"name": "dgkd", "seed": 1}])
    trainer.train(resume_from_checkpoint=resume)
    if forwards is not None:
        forwards.extend(len(c) for c in calls)
    return {log["step"]: {k: v for k, v in log.items() if k.startswith("loss")}
            for log in trainer.state.log_history if "loss" in log}


def test_dgkd_drops_the_same_guides_after_a_resume(tmp_path):
    forwards = []
    straight = dgkd_run(str(tmp_path / "straight"), forwards=forwards)
    dgkd = build_distiller({"name": "dgkd", "seed": 1})
    assert sorted(straight) == [1, 2, 3, 4]
    # A dropped guide does not run: each guide ran in both micro-batches of the steps that kept it, and only those.
    assert forwards == [2 * sum(k not in dgkd.dropped(3, step) for step in range(4)) for k in range(3)]
    assert sum(forwards) == 2 * 4 * 2  # two guides kept per step
    for step, log in straight.items():  # step s ran at global_step s - 1; one guide dropped in both micro-batches
        assert [log[f"loss/dgkd/dropped_{k}"] for k in range(3)] == [
            float(k in dgkd.dropped(3, step - 1)) for k in range(3)], step
    assert len({tuple(log[f"loss/dgkd/dropped_{k}"] for k in range(3)) for log in straight.values()}) > 1
    dgkd_run(str(tmp_path / "resumed"))  # writes checkpoint-2, then is resumed from it
    resumed = dgkd_run(str(tmp_path / "resumed"), resume=str(tmp_path / "resumed" / "checkpoint-2"))
    for step in (3, 4):  # computed again after the resume
        assert resumed[step].keys() == straight[step].keys()
        for key, value in straight[step].items():
            assert resumed[step][key] == pytest.approx(value, rel=1e-5), (step, key)


# ---- CES-KD ------------------------------------------------------------------------------------------------------
def routed_batch():
    """Rows (true classes 0, 1, 2, 0) for teacher_model=[teacher, big assistant, small assistant]: row 0 only the
    teacher gets right, row 1 all do, row 2 the teacher and the big assistant, row 3 none."""
    labels = torch.tensor([0, 1, 2, 0])
    top = {"teacher": [0, 1, 2, 1], "big": [1, 1, 2, 2], "small": [2, 1, 0, 1]}  # each row's top class
    g = torch.Generator().manual_seed(0)
    guides = [torch.randn(4, 3, generator=g) + 6 * nn.functional.one_hot(torch.tensor(top[name]), 3)
              for name in ("teacher", "big", "small")]
    return torch.randn(4, 3, generator=g), guides, {"labels": labels}


def test_ces_kd_routes_each_row_to_the_smallest_correct_expert():
    z_s, guides, batch = routed_batch()
    student, *experts = views([z_s, *guides])
    loss, parts = build_distiller({"name": "ces_kd", "pace": 1.0, "temperature": 2.0})(student, experts, batch)
    route = [0, 2, 1, 0]  # teacher (only it is right), small (all are), big (small is wrong), teacher (none is)
    by_hand = torch.stack([kl_rows(z_s[r : r + 1], guides[e][r : r + 1], 2.0)[0] for r, e in enumerate(route)])
    assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-5)
    assert {k: v.item() for k, v in parts.items()} == {"routed_0": 0.5, "routed_1": 0.25, "routed_2": 0.25,
                                                         "open_experts": 3.0}
    teacher_only = build_distiller({"name": "ces_kd", "pace": 1.0, "temperature": 2.0, "selection": "largest"})
    assert teacher_only(student, experts, batch)[0].item() == pytest.approx(
        kl_rows(z_s, guides[0], 2.0).mean().item(), rel=1e-5)
    second = build_distiller({"name": "ces_kd", "pace": 1.0, "selection": lambda logits, targets: targets * 0 + 1})
    assert second(student, experts, batch)[1]["routed_1"].item() == 1.0  # index 1 of smallest-first: the big one


def test_ces_kd_selection_is_pluggable_by_name():
    from hf_kd.distillers import register_ces_selection

    @register_ces_selection("test_second_smallest")
    def second_smallest(logits, targets):
        return torch.ones_like(targets, dtype=torch.long)

    z_s, guides, batch = routed_batch()
    student, *experts = views([z_s, *guides])
    loss, parts = build_distiller({"name": "ces_kd", "pace": 1.0, "temperature": 2.0,
                                   "selection": "test_second_smallest"})(student, experts, batch)
    assert parts["routed_1"].item() == 1.0  # the ladder is smallest first: index 1 is the big assistant
    assert loss.item() == pytest.approx(kl_rows(z_s, guides[1], 2.0).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"unknown `selection` 'no_such'. Valid names: .*test_second_smallest"):
        build_distiller({"name": "ces_kd", "selection": "no_such"})


def test_ces_kd_pacing_opens_the_ladder_from_the_smallest_expert():
    z_s, guides, batch = routed_batch()
    student, *experts = views([z_s, *guides])
    ces = build_distiller({"name": "ces_kd"})  # pace: linear 0 -> 1 over the training
    # step 0: the small assistant alone; step 1: small and big open, rows 0 and 3 (both wrong) go to the big one;
    # from step 2 (pace 2/3): every expert, as with pace=1
    expected = {0: ([2, 2, 2, 2], 1), 1: ([1, 2, 1, 1], 2), 2: ([0, 2, 1, 0], 3), 3: ([0, 2, 1, 0], 3)}
    for step, (route, open_count) in expected.items():
        ces.set_progress(step, 3)
        loss, parts = ces(student, experts, batch)
        assert parts["open_experts"].item() == open_count, step
        assert [parts[f"routed_{k}"].item() for k in range(3)] == [route.count(k) / 4 for k in range(3)], step
        by_hand = torch.stack([kl_rows(z_s[r : r + 1], guides[e][r : r + 1], 4.0)[0] for r, e in enumerate(route)])
        assert loss.item() == pytest.approx(by_hand.mean().item(), rel=1e-5), step
    ces.pace = 15 / 22  # (15 / 22) * 22 < 15 in floating point: the edge of the stratum still opens expert 16
    assert [ces.open_experts(22), ces.open_experts(1)] == [16, 1]


def test_ces_kd_routes_the_tokens_of_a_causal_lm():
    labels = torch.tensor([[5, 1, 2, -100], [3, 4, 0, 6]])  # row r predicts the next label; -100: no target
    g = torch.Generator().manual_seed(1)
    z_s, teacher, small = (torch.randn(2, 4, 7, generator=g) for _ in range(3))
    targets = labels[:, 1:]
    boosted = torch.tensor([[1, 0, 0], [0, 1, 1]])[..., None]  # where the small expert is made right
    small[:, :-1] += 8 * nn.functional.one_hot(targets.clamp_min(0), 7) * boosted
    student, *experts = views([z_s, teacher, small], task="causal_lm")
    loss, parts = build_distiller({"name": "ces_kd", "pace": 1.0})(student, experts, {"labels": labels})
    valid = targets != -100
    small_right = small[:, :-1].argmax(-1) == targets
    routed = torch.where(small_right, 1, 0)[valid]  # the small expert where it is right, else the teacher
    assert routed.tolist() == [1, 0, 0, 1, 1]
    assert parts["routed_1"].item() == pytest.approx(3 / 5) and parts["routed_0"].item() == pytest.approx(2 / 5)
    per_token = torch.where(routed == 1, kl_rows(z_s[:, :-1][valid], small[:, :-1][valid], 4.0),
                            kl_rows(z_s[:, :-1][valid], teacher[:, :-1][valid], 4.0))
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_ces_kd_with_one_teacher_is_kl(output_dir):
    inputs = {k: torch.tensor(v) for k, v in text_classification_data(n=6, seed=5)[:].items()}
    values = {}
    for name in ("kl", "ces_kd"):
        trainer = DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=bert(seed=2, layers=3),
                                      distillers=[{"name": name, "temperature": 3.0}], args=training_args(output_dir),
                                      train_dataset=text_classification_data())
        with torch.no_grad():
            trainer.compute_loss(trainer.model.eval(), dict(inputs))
        values[name] = trainer.ledger.pop_eval(lambda v: v.reshape(1))[name]
    assert values["ces_kd"] == pytest.approx(values["kl"], rel=1e-6) and values["kl"] > 0


def test_ces_kd_logs_routing_and_pacing_in_training(output_dir):
    experts = [bert(seed=2, layers=3, hidden=32), bert(seed=3, hidden=24), bert(seed=4, hidden=16)]
    calls = count_forwards(experts)
    trainer = DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=experts,
                                  distillers=[{"name": "ces_kd"}], train_dataset=text_classification_data(),
                                  args=training_args(output_dir, max_steps=3, logging_steps=1,
                                                     gradient_accumulation_steps=2, per_device_train_batch_size=2))
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["loss/ces_kd/open_experts"] for log in logs] == [1.0, 2.0, 3.0]
    # An expert runs from the step that opens it (2 micro-batches per step): the teacher in the last step only.
    assert [len(c) for c in calls] == [2, 4, 6]
    for log in logs:
        shares = [log[f"loss/ces_kd/routed_{k}"] for k in range(3)]
        assert sum(shares) == pytest.approx(1.0)
        assert all(share == 0 for share in shares[: 3 - int(log["loss/ces_kd/open_experts"])])  # closed: none
    assert logs[0]["loss/ces_kd/routed_2"] == 1.0  # the first step: the smallest assistant alone


def test_ces_kd_errors(output_dir):
    def build(teachers, data=None, hard_label_weight=1.0):
        return DistillationTrainer(model=bert(seed=1, hidden=16), teacher_model=teachers,
                                   distillers=[{"name": "ces_kd"}], train_dataset=data or text_classification_data(),
                                   args=training_args(output_dir, max_steps=1, hard_label_weight=hard_label_weight))

    with pytest.raises(ValueError, match=r"largest to smallest.*teacher 1 has .* more than teacher 0"):
        build([bert(seed=2, hidden=16), bert(seed=3, hidden=32)])
    no_labels = text_classification_data().remove_columns("labels")
    with pytest.raises(ValueError, match=r"\['ces_kd'\] need `labels`"):
        build([bert(seed=2, hidden=32), bert(seed=3, hidden=16)], no_labels, hard_label_weight=0.0).train()
    z_s, guides, batch = routed_batch()
    student, teacher, *assistants = views([z_s, *guides])
    fused = ModelView(model=teacher.model, task="classification", head_input=torch.zeros(4, 2),
                      head=nn.Linear(2, 3))
    with pytest.raises(ValueError, match="fused_lm_loss=False"):
        build_distiller({"name": "ces_kd", "pace": 1.0})(student, [fused, *assistants], batch)
    with pytest.raises(ValueError, match="one integer expert index per row"):
        build_distiller({"name": "ces_kd", "selection": lambda logits, targets: targets.float()})(
            student, [teacher, *assistants], batch)

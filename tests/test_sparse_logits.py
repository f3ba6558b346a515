"""A top-k teacher (``SparseLogits``: k logits and one shared tail logit) read without making it dense: forward and
reverse KL equal the dense computation, values and gradients, at any temperature, with ``k = V`` and with an empty
tail; the row pass hands it as it is to the terms that read it so and makes it dense, chunk by chunk, for the others,
on the fused head path too; a trainer fed from a top-k cache forms no ``[B, T, V]`` teacher tensor and trains as
when every distiller reads the dense form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_teacher_cache import cacheable, run

from conftest import llama, lm_data
from hf_kd.cache import cache_teacher_outputs, tail_log_mass
from hf_kd.distillers import divergences
from hf_kd.distillers.logit import LogitDistiller
from hf_kd.row_loss import LogitSource, RowTerm, row_losses
from hf_kd.sparse_logits import SparseLogits

pytestmark = pytest.mark.usefixtures("one_thread")

V = 11


def teacher_rows(k: int, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, SparseLogits]:
    """Teacher logits ``[n, V]`` and their top-k form (the cache's: values, indices, tail mass)."""
    z = torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3
    top = z.topk(k, dim=-1)
    return z, SparseLogits.from_tail(top.values, top.indices, tail_log_mass(z, top.indices), V)


def test_from_tail_keeps_the_top_k_probabilities_and_the_tail_mass():
    z, sparse = teacher_rows(4)
    p, q = z.softmax(-1), sparse.dense().softmax(-1)
    torch.testing.assert_close(q.gather(-1, sparse.indices), p.gather(-1, sparse.indices))
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(-1, sparse.indices, False)
    torch.testing.assert_close((q * outside).sum(-1), (p * outside).sum(-1))
    log_top, log_rest = sparse.log_probs()
    torch.testing.assert_close(log_top, q.gather(-1, sparse.indices).log())
    torch.testing.assert_close(log_rest.exp() * (V - 4) + log_top.exp().sum(-1), torch.ones(6))
    torch.testing.assert_close((sparse / 2.0).dense(), sparse.dense() / 2.0)
    _, full = teacher_rows(V)
    torch.testing.assert_close(full.dense(), z)


@pytest.mark.parametrize("k", [1, 4, V])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("divergence", [divergences.forward_kl, divergences.reverse_kl])
def test_sparse_kl_equals_the_dense_kl_with_its_gradient(divergence, temperature, k):
    _, sparse = teacher_rows(k)
    student = torch.randn(6, V, generator=torch.Generator().manual_seed(1), requires_grad=True)
    got = divergences.tempered(divergence, student, sparse, temperature)
    (grad_got,) = torch.autograd.grad(got.sum(), student)
    want = divergences.tempered(divergence, student, sparse.dense(), temperature)
    (grad_want,) = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)


def test_an_empty_tail_gives_the_top_k_kl_without_nan():
    """A teacher whose top k hold all its mass (tail -inf): KL over the top k alone, finite gradient."""
    values, indices = torch.tensor([[5.0, 1.0]]), torch.tensor([[3, 7]])
    sparse = SparseLogits.from_tail(values, indices, torch.tensor([-math.inf]), V)
    student = torch.randn(1, V, requires_grad=True)
    p = values.softmax(-1)
    log_q = student.log_softmax(-1).gather(-1, indices)
    loss = divergences.forward_kl(student, sparse)
    torch.testing.assert_close(loss, (p * (p.log() - log_q)).sum(-1))
    (grad,) = torch.autograd.grad(loss.sum(), student)
    want = student.detach().softmax(-1)  # dKL/dz = q - p~, p~ zero off the top k
    want[0, indices[0]] -= p[0]
    torch.testing.assert_close(grad, want)


def test_the_closed_form_gradient_passes_gradcheck_and_a_trained_teacher_gets_its_own():
    """The student's gradient is written out (``s q - p~``): float64 gradcheck at a tempered student, under an
    uneven upstream gradient; a teacher whose tensors require grad takes the autograd form, which reaches them."""
    _, sparse = teacher_rows(4)
    sparse64 = SparseLogits(sparse.values.double(), sparse.indices, sparse.rest.double(), V)
    student = torch.randn(6, V, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    weights = torch.arange(1.0, 7.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: divergences.forward_kl(z / 2.0, sparse64 / 2.0) * weights, (student,))
    values = sparse64.values.clone().requires_grad_()
    trained = SparseLogits(values, sparse64.indices, sparse64.rest, V)
    loss = divergences.forward_kl(student, trained)
    torch.testing.assert_close(loss, divergences.forward_kl(student, sparse64))
    (grad_values,) = torch.autograd.grad(loss.sum(), values)
    dense = sparse64.dense().requires_grad_()
    (grad_dense,) = torch.autograd.grad(divergences.forward_kl(student, dense).sum(), dense)
    torch.testing.assert_close(grad_values, grad_dense.gather(-1, sparse64.indices))


def term(name, fn, sparse):
    return RowTerm(name, fn, {"kl": 0.7, "jsd": 0.5, "hard": 1.0}[name], sparse_teacher=sparse)


@pytest.mark.parametrize("fused", [False, True])
def test_the_row_pass_reads_a_sparse_teacher_as_its_dense_logits(fused):
    """kl reads the sparse teacher, jsd the dense one (made per chunk), the cross-entropy none: all three, and the
    gradients of the student's logits (or head input and head weight), equal the pass over the dense teacher, in
    chunks of 4 of 10 rows."""
    generator = torch.Generator().manual_seed(3)
    _, sparse = teacher_rows(3, n=12)
    rows, targets = torch.tensor([0, 1, 2, 4, 5, 6, 7, 8, 9, 11]), torch.randint(0, V, (10,), generator=generator)

    def terms(sparse_kl):
        return [term("hard", lambda s, t, y: F.cross_entropy(s, y, reduction="none"), True),
                term("kl", lambda s, t, y: divergences.tempered(divergences.forward_kl, s, t, 2.0), sparse_kl),
                term("jsd", lambda s, t, y: divergences.generalized_jsd(s, t, 0.5), False)]

    def student():
        if not fused:
            return LogitSource(torch.randn(12, V, generator=torch.Generator().manual_seed(4)).requires_grad_())
        return LogitSource(torch.randn(12, 5, generator=torch.Generator().manual_seed(4)).requires_grad_(),
                           torch.randn(V, 5, generator=torch.Generator().manual_seed(5)).requires_grad_())

    results = []
    for teacher, sparse_kl in ((sparse, True), (LogitSource(sparse.dense()), False)):
        source = student()
        total, values = row_losses(terms(sparse_kl), source, teacher, rows, targets, V, normalizer=10.0,
                                   chunk_size=4)
        total.backward()
        leaves = [t for t in (source.values, source.head_weight) if t is not None]
        results.append((total, values, [t.grad for t in leaves]))
    (total, values, grads), (want_total, want_values, want_grads) = results
    torch.testing.assert_close(total, want_total)
    for key in want_values:
        torch.testing.assert_close(values[key], want_values[key], msg=key)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_sparse_teacher_of_another_width_is_refused():
    _, sparse = teacher_rows(3)
    with pytest.raises(ValueError, match="top-k teacher of width 11 cannot be read over a vocabulary of 9"):
        row_losses([term("kl", divergences.forward_kl, True)], LogitSource(torch.zeros(6, 9)), sparse,
                   torch.arange(6), None, 9, normalizer=6.0)


@pytest.fixture(scope="module")
def top_k_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("top_k")
    data, teacher = lm_data(n=16), llama(layers=3, hidden=48, seed=2)
    cache_teacher_outputs(teacher, data, folder / "cache", top_k=8, values_dtype="float32")
    return data, str(folder / "cache")


def test_a_top_k_cached_batch_forms_no_dense_teacher(top_k_cache, tmp_path):
    data, cache = top_k_cache
    trainer, _ = run_steps(cache, data, "kl", tmp_path)
    [slot] = trainer._slots
    batch = trainer.data_collator([{**data[i], "hf_kd_index": i} for i in range(4)])
    view = slot.forward(batch, trainer._flags, True, True)
    assert view.logits is None and view.sparse_logits.values.shape == (4, batch["input_ids"].shape[1], 8)


def run_steps(cache, data, name, folder, **options):
    from test_global_batch import CASES

    distillers = [{"name": name, **CASES[name].options}]
    return run(folder, name, llama(seed=1), data, cache=cache, distillers=distillers, max_steps=2, **options)


@pytest.mark.parametrize("name", cacheable())
def test_every_cacheable_distiller_trains_from_a_top_k_cache_as_from_its_dense_form(name, top_k_cache, tmp_path,
                                                                                   monkeypatch):
    data, cache = top_k_cache
    sparse = run_steps(cache, data, name, tmp_path / "sparse")
    assert sparse[0]._fused_lm
    monkeypatch.setattr(LogitDistiller, "reads_sparse_teacher", property(lambda self: False))
    dense = run_steps(cache, data, name, tmp_path / "dense")
    for want, got in zip(dense[1], sparse[1], strict=True):
        assert got.keys() == want.keys() and all(math.isfinite(v) for v in got.values())
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for (key, want), got in zip(dense[0].model.named_parameters(), sparse[0].model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)

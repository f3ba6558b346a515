"""The offline teacher cache: cached outputs equal the teacher's, fingerprints follow the inputs, an interrupted
build resumes where it stopped, a complete cache is reused and one built otherwise refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import default_data_collator

from conftest import bert, frozen, llama, lm_data, text_classification_data
from hf_kd.cache import METADATA, cache_teacher_outputs, load_teacher_cache, tail_log_mass
from hf_kd.sparse_logits import SparseLogits


def teacher_logits(model, data) -> torch.Tensor:
    batch = default_data_collator([data[i] for i in range(len(data))])
    with torch.inference_mode():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def test_classifier_logits_are_the_teachers(tmp_path):
    teacher, data = frozen(bert()), text_classification_data()
    cache = cache_teacher_outputs(teacher, data, tmp_path / "cache", values_dtype="float32", batch_size=5)
    assert len(cache) == len(data)
    np.testing.assert_allclose(np.array(cache["logits"]), teacher_logits(teacher, data).numpy(), atol=1e-6)
    _, metadata = load_teacher_cache(tmp_path / "cache")
    assert metadata["task"] == "classification" and metadata["logits_width"] == 3 and metadata["max_length"] == 12


def test_causal_lm_full_logits_at_the_labelled_positions(tmp_path):
    teacher, data = frozen(llama()), lm_data()
    cache = cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=None, values_dtype="float32", batch_size=4)
    logits = teacher_logits(teacher, data)
    labels = torch.tensor(data["labels"])
    for i, row in enumerate(cache):
        expected = (labels[i, 1:] != -100).nonzero().squeeze(-1)
        assert row["positions"] == expected.tolist()
        np.testing.assert_allclose(np.array(row["logits"]), logits[i, expected].numpy(), atol=1e-5)
    assert len(cache[0]["positions"]) == 7 and len(cache[1]["positions"]) == 11  # row 0 is padded, row 1 is not


def test_top_k_values_indices_and_tail(tmp_path):
    teacher, data = frozen(llama()), lm_data(n=6)
    cache = cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=5, values_dtype="float32", batch_size=4)
    logits = teacher_logits(teacher, data)
    for i, row in enumerate(cache):
        full = logits[i, row["positions"]]  # [n, V]
        top, indices = full.topk(5, dim=-1)
        assert row["topk_indices"] == indices.tolist()
        np.testing.assert_allclose(np.array(row["topk_values"]), top.numpy(), atol=1e-5)
        kept_mass = full.softmax(-1).gather(-1, torch.tensor(row["topk_indices"])).sum(-1)
        np.testing.assert_allclose(np.exp(np.array(row["tail"])) + kept_mass.numpy(), 1.0, atol=1e-5)
        assert np.all(np.array(row["tail"]) < 0)


def test_fingerprints_follow_the_inputs(tmp_path):
    teacher, data = frozen(bert()), text_classification_data(n=8)
    first = cache_teacher_outputs(teacher, data, tmp_path / "a")["fingerprint"]
    assert cache_teacher_outputs(teacher, data, tmp_path / "b")["fingerprint"] == first
    ids = [list(row) for row in data["input_ids"]]
    ids[5][2] = 3 if ids[5][2] != 3 else 4
    edited = data.remove_columns("input_ids").add_column("input_ids", ids)
    changed = cache_teacher_outputs(teacher, edited, tmp_path / "c")["fingerprint"]
    assert [a != b for a, b in zip(first, changed)] == [i == 5 for i in range(8)]
    assert len(set(first)) == 8 and all(len(f) == 16 for f in first)


def count_forwards(model, fail_at: int | None = None) -> list[int]:
    """Counts ``model``'s forward calls; the ``fail_at``-th call raises (once)."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("interrupted")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def test_an_interrupted_build_resumes_after_its_last_shard(tmp_path):
    data = lm_data(n=14)  # batches of 3: 5 batches, the last one of 2 rows
    options = dict(top_k=4, batch_size=3, shard_batches=1)
    reference = cache_teacher_outputs(frozen(llama()), data, tmp_path / "one_go", **options)

    teacher = frozen(llama())
    calls = count_forwards(teacher, fail_at=3)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache_teacher_outputs(teacher, data, tmp_path / "cache", **options)
    assert not (tmp_path / "cache").exists() and len(calls) == 3
    assert sorted(p.name for p in (tmp_path / "cache.building").iterdir()) == ["building.json", "shard-00000",
                                                                               "shard-00001"]
    (tmp_path / "cache.building" / "shard-00002.tmp").mkdir()  # as a kill while saving a shard leaves it
    (tmp_path / "cache.building" / "shard-00002.tmp" / "data-00000-of-00001.arrow").write_bytes(b"half")
    resumed = cache_teacher_outputs(teacher, data, tmp_path / "cache", **options)
    assert len(calls) == 3 + 3  # batches 3, 4 and 5 only
    assert resumed.to_list() == reference.to_list()
    assert (tmp_path / "cache" / METADATA).is_file() and not (tmp_path / "cache.building").exists()


def test_a_complete_cache_is_reused_and_one_built_otherwise_refused(tmp_path):
    data = lm_data(n=6)
    built = cache_teacher_outputs(frozen(llama()), data, tmp_path / "cache", top_k=4)
    (tmp_path / "cache.building").mkdir()  # as left by a build stopped between its rename and its cleanup
    teacher = frozen(llama())
    calls = count_forwards(teacher)
    assert cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=4).to_list() == built.to_list()
    assert calls == [] and not (tmp_path / "cache.building").exists()
    with pytest.raises(ValueError, match="top_k: cached 4, asked 8"):
        cache_teacher_outputs(teacher, data, tmp_path / "cache", top_k=8)
    assert calls == []


def test_a_folder_without_metadata_is_not_a_cache(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="teacher_cache.*cache_teacher_outputs"):
        load_teacher_cache(tmp_path / "half")


class Vocabulary:
    """What the cache reads of a tokenizer: its vocabulary."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_the_tokenizer_is_part_of_the_metadata(tmp_path):
    teacher, data = frozen(bert()), text_classification_data(n=4)
    cache_teacher_outputs(teacher, data, tmp_path / "cache", tokenizer=Vocabulary({"a": 0, "b": 1}))
    cache_teacher_outputs(teacher, data, tmp_path / "cache", tokenizer=Vocabulary({"b": 1, "a": 0}))  # same vocab
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        cache_teacher_outputs(teacher, data, tmp_path / "cache", tokenizer=Vocabulary({"a": 0, "c": 1}))


def test_sparse_logits_from_top_k_and_tail_by_hand():
    """V = 5, k = 2: the top-2 logits are the teacher's; the tail mass is spread evenly over the other 3 entries;
    the softmax keeps the teacher's top-2 probabilities and its tail mass exactly; k = V gives the logits back."""
    z = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    top = z.topk(2, dim=-1)
    tail = tail_log_mass(z, top.indices)
    p = z.softmax(-1)[0]
    assert tail.exp().item() == pytest.approx((p[1] + p[2] + p[4]).item(), rel=1e-6)
    dense = SparseLogits.from_tail(top.values, top.indices, tail, 5).dense()
    q = dense.softmax(-1)[0]
    assert dense[0, 3].item() == 3.0 and dense[0, 0].item() == 2.0  # the teacher's own top-2 logits
    assert [q[3].item(), q[0].item()] == pytest.approx([p[3].item(), p[0].item()], rel=1e-6)
    for j in (1, 2, 4):
        assert q[j].item() == pytest.approx((p[1] + p[2] + p[4]).item() / 3, rel=1e-6)
    full = z.topk(5, dim=-1)
    torch.testing.assert_close(SparseLogits.from_tail(full.values, full.indices, tail_log_mass(z, full.indices),
                                                5).dense(), z)


def test_hidden_states_per_token_and_pooled_are_the_teachers(tmp_path):
    """``hidden_states=[0, -1]``: each row's first n (non-padding) tokens of those layers; pooled ``mean``: the
    masked mean; an index outside the model and a left-padded batch (tokens) are refused."""
    teacher, data = frozen(bert(layers=2)), text_classification_data(n=7)
    batch = default_data_collator([data[i] for i in range(len(data))])
    with torch.inference_mode():
        hidden = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True).hidden_states
    tokens = cache_teacher_outputs(teacher, data, tmp_path / "t", values_dtype="float32", batch_size=3,
                                   hidden_states=[0, -1])
    _, metadata = load_teacher_cache(tmp_path / "t")
    assert (metadata["hidden_states"], metadata["hidden_pooling"]) == ([0, 2], "tokens")
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert lengths[0] == 6 and lengths[1] == 12  # padded rows keep their tokens only
    for i, row in enumerate(tokens):
        for layer in (0, 2):
            np.testing.assert_allclose(np.array(row[f"hidden_{layer}"]), hidden[layer][i, : lengths[i]].numpy(),
                                       atol=1e-5)
    pooled = cache_teacher_outputs(teacher, data, tmp_path / "p", values_dtype="float32", hidden_states=[-1],
                                   hidden_pooling="mean")
    mask = batch["attention_mask"].float()
    mean = (hidden[2] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    np.testing.assert_allclose(np.array(pooled["hidden_2"]), mean.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match=r"`hidden_states` takes indices of the teacher's 3 hidden states.*\[3\]"):
        cache_teacher_outputs(teacher, data, tmp_path / "bad", hidden_states=[3])
    left = data.map(lambda row: {"attention_mask": row["attention_mask"][::-1]})
    with pytest.raises(ValueError, match=r"hidden_pooling='tokens'.*left-padded"):
        cache_teacher_outputs(teacher, left, tmp_path / "left", hidden_states=[-1])
    cache_teacher_outputs(teacher, left, tmp_path / "left_pooled", hidden_states=[-1], hidden_pooling="cls")


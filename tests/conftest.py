"""Tiny models built from configs (dropout off, so train-mode outputs are deterministic) and small synthetic
datasets: no network, seconds per test."""

from __future__ import annotations

import os

import pytest
import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from hf_kd import DistillationArguments, tokenize_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

VOCAB = 97
EAGER = {"attn_implementation": "eager"}  # the attention implementation that returns attention maps


def bert(
    num_labels: int = 3, layers: int = 2, hidden: int = 32, seed: int = 0, heads: int = 2, **kwargs
) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    kwargs = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kwargs}
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=num_labels, **kwargs,
    )
    return BertForSequenceClassification(config)


def bert_pair() -> tuple[BertForSequenceClassification, BertForSequenceClassification]:
    """A 2-layer student and a deeper (4), wider (48) teacher, both with eager attention (attention maps)."""
    return bert(layers=2, hidden=32, seed=1, **EAGER), bert(layers=4, hidden=48, seed=2, **EAGER)


def llama(vocab: int = VOCAB, layers: int = 2, hidden: int = 32, seed: int = 0, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **kwargs,
    )
    return LlamaForCausalLM(config)


def gpt2(vocab: int = VOCAB, layers: int = 2, hidden: int = 32, seed: int = 0, **kwargs) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kwargs,
    )
    return GPT2LMHeadModel(config)


def vit(
    num_labels: int = 4, layers: int = 2, hidden: int = 32, seed: int = 0, patch_size: int = 2, **kwargs
) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8, patch_size=patch_size, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, num_labels=num_labels, **kwargs,
    )
    return ViTForImageClassification(config)


def deit(
    num_labels: int = 4, layers: int = 1, hidden: int = 16, seed: int = 0
) -> DeiTForImageClassificationWithTeacher:
    """A DeiT with a class token + head and a distillation token + head, on the 8x8 one-channel images."""
    torch.manual_seed(seed)
    config = DeiTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=2, intermediate_size=2 * hidden, num_labels=num_labels,
    )
    return DeiTForImageClassificationWithTeacher(config)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as the trainer prepares a teacher: eval mode, no gradients."""
    return model.eval().requires_grad_(False)


def training_args(output_dir, **overrides) -> DistillationArguments:
    """Arguments of a test run: CPU, no reports, no checkpoints, no progress bars, batches of 4; ``overrides`` win."""
    defaults = dict(output_dir=str(output_dir), report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
                    per_device_train_batch_size=4)
    return DistillationArguments(**{**defaults, **overrides})


def text_classification_data(n: int = 16, length: int = 12, num_labels: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, length // 2 :] = 0  # some padded rows
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def lm_data(n: int = 16, length: int = 12, vocab: int = VOCAB, seed: int = 0, with_labels: bool = True) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[::3, length - 4 :] = 0  # right padding in some rows
    columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    if with_labels:
        columns["labels"] = ids.masked_fill(mask == 0, -100).tolist()
    return Dataset.from_dict(columns)


PAD, EOS = 0, 2  # the tiny causal LMs' pad and EOS tokens (llama(), gpt2())


class Ids:
    """The tokenizer of prompt data given as token ids: only its EOS is read (tokenize_prompts ends completions)."""

    eos_token_id = EOS


def prompt_data(n: int = 16, with_completion: bool = True, seed: int = 0) -> Dataset:
    """Prompt / completion rows of token ids (prompts of 2-5 tokens, completions of 2-4 and EOS), tokenized with
    hf_kd.tokenize_prompts: for hf_kd.PromptCompletionCollator(PAD)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(3, 50, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        row = {"prompt": prompt}
        if with_completion:
            length = int(torch.randint(2, 5, (1,), generator=g))
            row["completion"] = torch.randint(3, 50, (length,), generator=g).tolist()
        rows.append(row)
    return tokenize_prompts(Dataset.from_list(rows), Ids())


def image_data(n: int = 16, num_labels: int = 4, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 1, 8, 8, generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": labels.tolist()})


@pytest.fixture
def output_dir(tmp_path):
    return str(tmp_path / "out")


@pytest.fixture
def one_thread():
    """One torch thread, as the recipes' command lines run: tiny models gain nothing from a second thread, which only
    stalls steps when another process shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_bert_encoder(folder, words) -> str:
    """A random-init 2-layer BERT encoder (no classifier head) with a word-level tokenizer over ``words``, saved in
    ``folder``: a local stand-in for a Hub text teacher. Returns the folder."""
    from transformers import BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


"""Prompt / completion data for causal LMs: the loss covers the completion tokens only.

A dataset row is one of

* ``{"prompt": ..., "completion": ...}``: text (tokenized here) or token ids; ``completion`` may be absent (prompt
  only: the completions are generated in training, ``DistillationArguments.lmbda=1`` or ``seq_kd``),
* ``{"messages": [{"role": ..., "content": ...}, ...]}``: a conversation, laid out by the tokenizer's chat template;
  the last assistant message is the completion, the messages before it (with the generation prompt) the prompt.

:func:`tokenize_prompts` turns such rows into ``input_ids`` (prompt, then completion and EOS) and ``prompt_length``;
:class:`PromptCompletionCollator` pads them into a training batch: ``input_ids`` / ``attention_mask`` padded on the
right, ``labels`` ``-100`` on the prompt and the padding, and the prompts alone padded on the left
(``prompt_input_ids`` / ``prompt_attention_mask``), ready for batched generation (:mod:`hf_kd.on_policy`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

PROMPT_LENGTH = "prompt_length"  # the column that says where a row's completion starts
PROMPT_KEYS = ("prompt_input_ids", "prompt_attention_mask")  # the left-padded prompts of a batch


def tokenize_prompts(dataset: Any, tokenizer: Any, max_prompt_length: int | None = None,
                     max_completion_length: int | None = None, add_eos: bool = True) -> Any:
    """``dataset`` (a ``datasets.Dataset`` of prompt / completion or messages rows) with the columns ``input_ids``
    and ``prompt_length`` in place of its own.

    A prompt longer than ``max_prompt_length`` keeps its last tokens (the ones next to the completion); a completion
    longer than ``max_completion_length`` its first. ``add_eos`` ends each completion with the tokenizer's EOS token
    (unless it already ends with it), so the student learns to stop.
    """
    columns = set(dataset.column_names)
    if not ({"prompt"} <= columns or {"messages"} <= columns):
        raise ValueError(f"A prompt dataset needs a `prompt` column (and `completion`) or a `messages` column; this "
                         f"one has {sorted(columns)}.")

    def encode(row: Mapping[str, Any]) -> dict[str, Any]:
        prompt, completion = split_row(row, tokenizer)
        # a chat template writes the special tokens itself; a plain prompt gets the tokenizer's (BOS)
        prompt = ids_of(prompt, tokenizer, special="messages" not in row)
        completion = ids_of(completion, tokenizer, special=False)
        if completion is not None and add_eos and tokenizer.eos_token_id is not None and (
                not completion or completion[-1] != tokenizer.eos_token_id):
            completion = [*completion, tokenizer.eos_token_id]
        if max_prompt_length is not None:
            prompt = prompt[-max_prompt_length:]
        completion = (completion or [])[:max_completion_length]
        return {"input_ids": [*prompt, *completion], PROMPT_LENGTH: len(prompt)}

    return dataset.map(encode, remove_columns=dataset.column_names)


def split_row(row: Mapping[str, Any], tokenizer: Any) -> tuple[Any, Any]:
    """``(prompt, completion)`` of one row: its columns, or its conversation through the chat template (the
    completion is None for a prompt-only row, or a conversation not ending with an assistant message)."""
    if "messages" not in row:
        return row["prompt"], row.get("completion")
    messages = list(row["messages"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("A `messages` dataset is laid out by the tokenizer's chat template, and this tokenizer has "
                         "none. Set tokenizer.chat_template, or give `prompt` / `completion` columns.")
    turns = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if len(turns) == len(messages):
        return prompt, None
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    if not whole.startswith(prompt):
        raise ValueError("The chat template does not lay out the conversation as its prompt followed by the last "
                         "assistant message, so the completion cannot be told apart; give `prompt` / `completion` "
                         "columns instead.")
    return prompt, whole[len(prompt):]


def ids_of(text: str | Sequence[int] | None, tokenizer: Any, special: bool) -> list[int] | None:
    """Token ids of ``text`` (already ids: as they are); ``special``: with the tokenizer's special tokens."""
    if text is None or not isinstance(text, str):
        return None if text is None else [int(i) for i in text]
    return tokenizer(text, add_special_tokens=special)["input_ids"]


@dataclass
class PromptCompletionCollator:
    """Pads :func:`tokenize_prompts` rows into a batch (see the module docstring); other integer columns (e.g. the
    sample index) are stacked as they are."""

    pad_token_id: int

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(f["input_ids"]) for f in features]
        starts = [int(f[PROMPT_LENGTH]) for f in features]
        width = max(len(row) for row in ids)
        prompt_width = max(starts)
        batch = {"input_ids": torch.full((len(ids), width), self.pad_token_id),
                 "attention_mask": torch.zeros(len(ids), width, dtype=torch.long),
                 "labels": torch.full((len(ids), width), -100),
                 PROMPT_KEYS[0]: torch.full((len(ids), prompt_width), self.pad_token_id),
                 PROMPT_KEYS[1]: torch.zeros(len(ids), prompt_width, dtype=torch.long)}
        for i, (row, start) in enumerate(zip(ids, starts)):
            tokens = torch.tensor(row, dtype=torch.long)
            batch["input_ids"][i, : len(row)] = tokens
            batch["attention_mask"][i, : len(row)] = 1
            batch["labels"][i, start : len(row)] = tokens[start:]
            batch[PROMPT_KEYS[0]][i, prompt_width - start :] = tokens[:start]  # prompts on the left
            batch[PROMPT_KEYS[1]][i, prompt_width - start :] = 1
        for key in features[0].keys() - {"input_ids", PROMPT_LENGTH}:
            batch[key] = torch.tensor([f[key] for f in features])
        return batch


def lacks_completions(dataset: Any, rows: int = 64) -> bool:
    """Whether the first ``rows`` rows of a :func:`tokenize_prompts` dataset are all prompt only (no token after
    ``prompt_length``); False for a dataset without a ``prompt_length`` column."""
    if dataset is None or PROMPT_LENGTH not in (getattr(dataset, "column_names", None) or []):
        return False
    head = dataset.select(range(min(rows, len(dataset))))
    return all(len(ids) <= start for ids, start in zip(head["input_ids"], head[PROMPT_LENGTH]))

"""Instruction data for fine-tuning (the book's chapter 7): examples, the padding collate, responses.

An example is the Alpaca prompt followed by its response, as token ids (`prompt_ids + response_ids`
from the sample stage, so the split between them is exact). `instruction_collate` batches them the
book's way: each example gets one end-of-text token, the batch is padded with it to the longest,
targets are the inputs shifted by one, and every padding target but the first (the end-of-text the
model must learn to emit) is ignored (-100). `mask_prompt` also ignores the prompt's targets, so only
the response is learned (the book's exercise 7.2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from scratchgpt.data.datasets import DatasetError, format_prompt, read_parquet
from scratchgpt.nn.generate import generate_batch
from scratchgpt.nn.model import GPTModel

log = logging.getLogger(__name__)

END_OF_TEXT = 50256
IGNORE_INDEX = -100
RESPONSE_HEADER = "### Response:"


class InstructionDataset(Dataset):
    """`(token ids, prompt length)` per record of an instruction split (`prompt_ids`, `response_ids`),
    held in memory; `records` keeps the text columns (instruction, input, output)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        table = read_parquet(self.path)
        missing = {"prompt_ids", "response_ids", "instruction", "input", "output"} - set(table.column_names)
        if missing:
            raise DatasetError(f"{self.path}: missing column(s) {sorted(missing)}")
        prompts = table.column("prompt_ids").to_pylist()
        responses = table.column("response_ids").to_pylist()
        self.prompts = [torch.tensor(p, dtype=torch.long) for p in prompts]
        self.examples = [torch.tensor(p + r, dtype=torch.long) for p, r in zip(prompts, responses, strict=True)]
        self.records = table.select(["instruction", "input", "output"]).to_pylist()
        if any(len(p) == 0 for p in prompts):
            raise DatasetError(f"{self.path}: a record has an empty prompt")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.examples[index], len(self.prompts[index])


def instruction_collate(
    *,
    pad_id: int = END_OF_TEXT,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = 1024,
    mask_prompt: bool = False,
) -> Callable[[list[Any]], tuple[Tensor, Tensor]]:
    """Batch `(ids, prompt length)` items as `(inputs, targets)` (B, T), T = the longest example
    (cut to `allowed_max_length`). Row with n tokens: inputs = ids + padding; targets = ids[1:], then
    `pad_id` once (end of text), then `ignore_index`; with `mask_prompt` the targets that are prompt
    tokens (the first prompt length - 1) are ignored too."""

    def collate(items: list[Any]) -> tuple[Tensor, Tensor]:
        width = max(len(ids) for ids, _ in items)
        inputs = torch.full((len(items), width), pad_id, dtype=torch.long)
        targets = torch.full((len(items), width), ignore_index, dtype=torch.long)
        for row, (ids, n_prompt) in enumerate(items):
            n = len(ids)
            inputs[row, :n] = ids
            targets[row, : n - 1] = ids[1:]
            targets[row, n - 1] = pad_id
            if mask_prompt:
                targets[row, : n_prompt - 1] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
        return inputs, targets

    return collate


def extract_response(generated: str) -> str:
    """The model's response from the text it generated after the prompt (the book's clean-up)."""
    return generated.replace(RESPONSE_HEADER, "").strip()


def encode_prompt(tokenizer, instruction: str, input_text: str = "") -> list[int]:
    """Token ids of the Alpaca prompt the model was fine-tuned on, for an instruction and its optional input."""
    return tokenizer.encode_ordinary(format_prompt({"instruction": instruction, "input": input_text}))


def answer_prompts(model: GPTModel, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   batch_size: int = 16, temperature: float = 0.0, generator=None) -> list[str]:  # fmt: skip
    """The response to each tokenized prompt: batched, KV-cached generation up to end-of-text
    (`generate_batch`), `batch_size` prompts at a time, decoded and cleaned by `extract_response`."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        tokens = generate_batch(model, prompts[start : start + batch_size], max_new_tokens, eos_id=END_OF_TEXT,
                                pad_id=END_OF_TEXT, temperature=temperature, generator=generator)  # fmt: skip
        out += [extract_response(tokenizer.decode(t)) for t in tokens]
        log.info("responses: %d of %d", len(out), len(prompts))
    return out

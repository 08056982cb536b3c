"""Instruction data: alpaca jsonl rows -> token ids with the loss on the response only.

A row is {"instruction": str, "input": str (optional), "output": str}. With a tokenizer that has a
chat template, the prompt is the user turn (instruction, blank line, input) rendered by that template;
otherwise the Stanford Alpaca prompt. Labels are -100 on the prompt and on padding.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def read_rows(path: str | Path, key: str, required=("instruction", "output")) -> list[dict]:
    """Rows of a jsonl (or json list) file, each checked for the required fields."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}={str(path)!r}: file not found")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"{key}={str(path)!r}: the file is empty")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}={str(path)!r}: not valid JSON ({e})") from None
        numbered = list(enumerate(rows if isinstance(rows, list) else [], start=1))
    else:
        numbered = []
        for i, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
            if line.strip():
                try:
                    numbered.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{key}={str(path)!r}: line {i} is not valid JSON ({e})") from None
    out = []
    for i, row in numbered:
        missing = [f for f in required if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        if missing:
            raise ConfigError(f"{key}={str(path)!r}: row {i} lacks the text field(s) {missing} of the alpaca format")
        out.append(row)
    if not out:
        raise ConfigError(f"{key}={str(path)!r}: no rows")
    return out


def _prompt(tokenizer, row: dict) -> str:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
    return ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block)


def tokenize_alpaca(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """Token ids and labels; examples whose response is cut away entirely by max_length are dropped."""
    out = []
    eos = tokenizer.eos_token or ""
    for row in rows:
        prompt_ids = tokenizer(_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(row["output"] + eos, add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        if any(label != -100 for label in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def load_examples(tokenizer, path: str, key: str, max_length: int, limit: int | None) -> list[dict]:
    rows = read_rows(path, key)
    if limit:
        rows = rows[:limit]
    examples = tokenize_alpaca(tokenizer, rows, max_length)
    if not examples:
        raise ConfigError(f"{key}={path!r}: every example's prompt is longer than data.max_length={max_length}, so "
                          "no response token is left to learn; raise data.max_length")
    return examples


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), n), -100, dtype=torch.long)
        attn = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            L = len(e["input_ids"])
            ids[i, :L] = torch.tensor(e["input_ids"])
            labels[i, :L] = torch.tensor(e["labels"])
            attn[i, :L] = 1
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}


class ShardedBatches:
    """Micro-batches for this rank: a seeded permutation per epoch, each global batch split by rank.

    Deterministic from (seed, position), so the same config gives the same data order.
    """

    def __init__(self, examples: list[dict], micro_batch_size: int, rank: int, world: int, seed: int):
        self.examples, self.mbs, self.rank, self.world, self.seed = examples, micro_batch_size, rank, world, seed
        self.position = 0  # micro-batches consumed by this rank

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> list[dict]:
        per_global = self.mbs * self.world
        per_epoch = max(1, len(self.examples) // per_global)
        epoch, i = divmod(self.position, per_epoch)
        order = self._order(epoch)
        if len(order) < per_global:  # tiny data: repeat it
            order = (order * (per_global // max(1, len(order)) + 1))[:per_global]
        start = i * per_global + self.rank * self.mbs
        self.position += 1
        return [self.examples[j] for j in order[start:start + self.mbs]]

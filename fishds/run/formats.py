"""The data formats, as one table: FORMATS[name] says what a row must hold and how it becomes token ids and labels.
Adding a format is one entry in FORMATS (config.DataSection takes its choices from it).

- alpaca: instruction, input (optional), output. The prompt is the user turn rendered by the
  tokenizer's chat template (or the Stanford Alpaca prompt without one); loss on the output only.
- chat: `messages` (data.messages_field), a list of {"role", "content"}, rendered with the tokenizer's
  chat template; loss on the assistant turns only.
- text: `text` (data.text_field); causal-LM loss on every token.
- classification: `text` and `label` (data.text_field, data.label_field); the label is an int or a
  string; the classes are the sorted distinct labels of the training file. Trains a sequence
  classification head (AutoModelForSequenceClassification) on an encoder or a decoder.

Examples a too-small data.max_length leaves without a single label token come back empty (dropped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # config.py takes the format names from FORMATS, so this module cannot import it first
    from ..config import DataSection


def _error(message: str):
    from ..config import ConfigError

    return ConfigError(message)

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
EMPTY = {"input_ids": [], "labels": []}


def _is_label(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _check_alpaca(row, data: DataSection) -> str | None:
    missing = [f for f in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(f), str)]
    return f"lacks the text field(s) {missing} of the alpaca format" if missing else None


def _check_chat(row, data: DataSection) -> str | None:
    msgs = row.get(data.messages_field)
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in msgs):
        return (f"lacks {data.messages_field!r} as a list of {{'role': str, 'content': str}} (data.messages_field, "
                "chat format)")
    if not any(m["role"] == "assistant" for m in msgs):
        return f"has no assistant turn in {data.messages_field!r}; the chat format learns the assistant turns"
    return None


def _check_text(row, data: DataSection) -> str | None:
    if not isinstance(row.get(data.text_field), str):
        return f"lacks the text field {data.text_field!r} (data.text_field, {data.format} format)"
    return None


def _check_classification(row, data: DataSection) -> str | None:
    problem = _check_text(row, data)
    if problem is None and not _is_label(row.get(data.label_field)):
        return (f"lacks the label field {data.label_field!r} as an integer or a non-empty string (data.label_field, "
                "classification format)")
    return problem


def check_row(row, data: DataSection) -> str | None:
    """None if the row fits data.format, else what is wrong (completes 'row N ...')."""
    fmt = FORMATS[data.format]
    if fmt.needs_object and not isinstance(row, dict):
        return f"is not an object with the fields of the {data.format} format"
    return fmt.check(row, data)


def label_list(rows: list[dict], data: DataSection) -> list:
    """The sorted distinct labels (ints or strings, not mixed); class id = position in this list."""
    values = {r[data.label_field] for r in rows}
    if len({type(v) for v in values}) > 1:
        raise _error(f"data.label_field={data.label_field!r}: the training rows mix integer and string labels")
    if len(values) < 2:
        raise _error(f"data.path: the training rows have {len(values)} distinct value(s) of data.label_field="
                          f"{data.label_field!r}; classification needs at least 2")
    return sorted(values)


def _chat_ids(tokenizer, messages, max_length: int) -> dict:
    """Ids of the rendered conversation, labels on the assistant turns (found by rendering prefixes)."""
    def ids(msgs, gen: bool) -> list[int]:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = ids(messages, False)
    labels = [-100] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(ids(messages[:i], True)), len(ids(messages[:i + 1], False))
        labels[start:end] = full[start:end]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels} if any(x != -100 for x in labels) else EMPTY


def _alpaca_prompt(tokenizer, row: dict) -> str:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
    return ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block)


def _tokenize_alpaca(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    n = data.max_length
    prompt = tokenizer(_alpaca_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["output"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    ids, lab = (prompt + answer)[:n], ([-100] * len(prompt) + answer)[:n]
    return {"input_ids": ids, "labels": lab} if any(x != -100 for x in lab) else EMPTY


def _tokenize_chat(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    return _chat_ids(tokenizer, row[data.messages_field], data.max_length)


def _tokenize_text(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    n = data.max_length
    ids = tokenizer(row[data.text_field] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"][:n]
    return {"input_ids": ids, "labels": list(ids)} if len(ids) > 1 else EMPTY


def _tokenize_classification(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    value = row[data.label_field]
    if value not in labels:
        raise _error(f"label {value!r} (data.label_field={data.label_field!r}) is not among the training "
                     f"file's labels {labels}")
    ids = tokenizer(row[data.text_field], truncation=True, max_length=data.max_length)["input_ids"]
    return {"input_ids": ids, "labels": labels.index(value)}


def tokenize_row(tokenizer, row: dict, data: DataSection, labels: list | None = None) -> dict:
    """{"input_ids": [...], "labels": [...] per token, or the class id for classification}."""
    return FORMATS[data.format].tokenize(tokenizer, row, data, labels)


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples (in file order) into sequences of max_length tokens; labels travel with their tokens.

    Attention is not blocked between packed examples (as in TRL's and torchtune's plain packing).
    """
    out, ids, lab = [], [], []
    for e in examples:
        ids += e["input_ids"]
        lab += e["labels"]
        while len(ids) >= max_length:
            out.append({"input_ids": ids[:max_length], "labels": lab[:max_length]})
            ids, lab = ids[max_length:], lab[max_length:]
    if ids and any(x != -100 for x in lab[1:]):
        out.append({"input_ids": ids, "labels": lab})
    return [e for e in out if any(x != -100 for x in e["labels"][1:])]


@dataclass(frozen=True)
class Format:
    check: Callable  # (row, data) -> None, or what is wrong with the row
    tokenize: Callable  # (tokenizer, row, data, labels) -> {"input_ids", "labels"} (EMPTY: nothing to learn)
    classification: bool = False  # one class label per example: a sequence-classification head, no packing
    needs_object: bool = True  # the row must be a JSON object (alpaca's check reports missing fields itself)
    chat_template: bool = False  # needs a tokenizer with a chat template
    response_only: bool = False  # the loss is on the response tokens only (a long prompt can leave none)


FORMATS: dict[str, Format] = {
    "alpaca": Format(_check_alpaca, _tokenize_alpaca, needs_object=False, response_only=True),
    "chat": Format(_check_chat, _tokenize_chat, chat_template=True, response_only=True),
    "text": Format(_check_text, _tokenize_text),
    "classification": Format(_check_classification, _tokenize_classification, classification=True),
}

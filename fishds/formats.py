"""The four data formats: what a row must hold, and how it becomes token ids and labels.

- alpaca: instruction, input (optional), output. The prompt is the user turn rendered by the
  tokenizer's chat template (or the Stanford Alpaca prompt without one); loss on the output only.
- chat: `messages` (data.messages_field), a list of {"role", "content"}, rendered with the tokenizer's
  chat template; loss on the assistant turns only.
- text: `text` (data.text_field); causal-LM loss on every token.
- packing (data.packing): whole examples packed into blocks of max_length tokens (`pack`), attention isolated per
  example by the Collator (fishds/data.py).
- classification: `text` and `label` (data.text_field, data.label_field); the label is an int or a
  string; the classes are the sorted distinct labels of the training file. Trains a sequence
  classification head (AutoModelForSequenceClassification) on an encoder or a decoder.

Every tokenized example says whether data.max_length cut it (`truncated`: 0 or 1); examples a too-small
data.max_length leaves without a single label token come back empty (dropped). fishds/data.py counts both.
"""
from __future__ import annotations

from .config import ConfigError, DataSection

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
EMPTY = {"input_ids": [], "labels": []}


def _fit(ids: list[int], labels: list[int], n: int, learn_one: bool = False) -> dict:
    """The example cut to n tokens, flagged truncated; empty (dropped) when no label token is left."""
    kept = [x for x in labels[1 if learn_one else 0:n] if x != -100]
    out = {"input_ids": ids[:n], "labels": labels[:n]} if kept else dict(EMPTY)
    return {**out, "truncated": int(len(ids) > n)}


def _is_label(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def check_row(row, data: DataSection) -> str | None:
    """None if the row fits data.format, else what is wrong (completes 'row N ...')."""
    fmt = data.format
    if fmt == "alpaca":
        missing = [f for f in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(f), str)]
        return f"lacks the text field(s) {missing} of the alpaca format" if missing else None
    if not isinstance(row, dict):
        return f"is not an object with the fields of the {fmt} format"
    if fmt == "chat":
        msgs = row.get(data.messages_field)
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in msgs):
            return (f"lacks {data.messages_field!r} as a list of {{'role': str, 'content': str}} (data.messages_field, "
                    "chat format)")
        if not any(m["role"] == "assistant" for m in msgs):
            return f"has no assistant turn in {data.messages_field!r}; the chat format learns the assistant turns"
        return None
    if not isinstance(row.get(data.text_field), str):
        return f"lacks the text field {data.text_field!r} (data.text_field, {fmt} format)"
    if fmt == "classification" and not _is_label(row.get(data.label_field)):
        return (f"lacks the label field {data.label_field!r} as an integer or a non-empty string (data.label_field, "
                "classification format)")
    return None


def label_list(rows: list[dict], data: DataSection) -> list:
    """The sorted distinct labels (ints or strings, not mixed); class id = position in this list."""
    values = {r[data.label_field] for r in rows}
    if len({type(v) for v in values}) > 1:
        raise ConfigError(f"data.label_field={data.label_field!r}: the training rows mix integer and string labels")
    if len(values) < 2:
        raise ConfigError(f"data.path: the training rows have {len(values)} distinct value(s) of data.label_field="
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
    return _fit(full, labels, max_length)


def _alpaca_prompt(tokenizer, row: dict) -> str:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
    return ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block)


def tokenize_row(tokenizer, row: dict, data: DataSection, labels: list | None = None) -> dict:
    """{"input_ids": [...], "labels": [...] per token, or the class id for classification, "truncated": 0 or 1}."""
    n = data.max_length
    if data.format == "alpaca":
        prompt = tokenizer(_alpaca_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["output"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        return _fit(prompt + answer, [-100] * len(prompt) + answer, n)
    if data.format == "chat":
        return _chat_ids(tokenizer, row[data.messages_field], n)
    if data.format == "text":
        ids = tokenizer(row[data.text_field] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        return _fit(ids, list(ids), n, learn_one=True)  # the first token is never predicted
    value = row[data.label_field]
    if value not in labels:
        raise ConfigError(f"label {value!r} (data.label_field={data.label_field!r}) is not among the training "
                          f"file's labels {labels}")
    ids = tokenizer(row[data.text_field])["input_ids"]
    if len(ids) > n:  # tokenized again with truncation: the tokenizer keeps its special tokens at the end
        return {"input_ids": tokenizer(row[data.text_field], truncation=True, max_length=n)["input_ids"],
                "labels": labels.index(value), "truncated": 1}
    return {"input_ids": ids, "labels": labels.index(value), "truncated": 0}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Whole examples, in order, greedily into blocks of at most max_length tokens; an example is never cut (each is
    at most max_length already: truncated when tokenized). A block holds the examples' tokens and labels back to
    back and `seq_lens`, their lengths, from which the Collator makes position ids restarting per example and
    per-example attention isolation. Each example's first label is set to -100, as transformers'
    DataCollatorWithFlattening does: alone, that label is never predicted (nothing precedes it), and in a block it
    would be predicted from the previous example."""
    out, ids, lab, lens = [], [], [], []
    for e in examples:
        n = len(e["input_ids"])
        if n > max_length:
            raise ValueError(f"pack: an example of {n} tokens is longer than max_length={max_length}")
        if ids and len(ids) + n > max_length:
            out.append({"input_ids": ids, "labels": lab, "seq_lens": lens})
            ids, lab, lens = [], [], []
        ids.extend(e["input_ids"])
        lab.extend([-100, *e["labels"][1:]])
        lens.append(n)
    if ids:
        out.append({"input_ids": ids, "labels": lab, "seq_lens": lens})
    return out

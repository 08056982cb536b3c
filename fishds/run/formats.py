"""The data formats, as one table: FORMATS[name] says what a row must hold and how it becomes token ids and labels.
Adding a format is one entry in FORMATS (config.DataSection takes its choices from it).

- alpaca: instruction, input (optional), output. The prompt is the user turn rendered by the
  tokenizer's chat template (or the Stanford Alpaca prompt without one); loss on the output only.
- chat: `messages` (data.messages_field), a list of {"role", "content"} (data.role_field, data.content_field;
  ShareGPT's from / value with human / gpt mapped by data.role_map), rendered with the tokenizer's chat template
  or data.chat_template; loss on the assistant turns (data.train_turns: all of them, the last, or every token).
- text: `text` (data.text_field); causal-LM loss on every token.
- packing (data.packing): whole examples packed into blocks of max_length tokens (`pack`), attention isolated per
  example by the Collator (fishds/run/data.py).
- classification: `text` and `label` (data.text_field, data.label_field); the label is an int or a
  string; the classes are the sorted distinct labels of the training file. Trains a sequence
  classification head (AutoModelForSequenceClassification) on an encoder or a decoder.

Every tokenized example says whether data.max_length cut it (`truncated`: 0 or 1); examples a too-small
data.max_length leaves without a single label token come back empty (dropped). fishds/run/data.py counts both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..schema import ConfigError
from ..schema import Section as DataSection  # the `data:` section (config.DataSection), which takes FORMATS' names

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
EMPTY = {"input_ids": [], "labels": []}


def _fit(ids: list[int], labels: list[int], n: int, learn_one: bool = False) -> dict:
    """The example cut to n tokens, flagged truncated; empty (dropped) when no label token is left."""
    kept = [x for x in labels[1 if learn_one else 0 : n] if x != -100]
    out = {"input_ids": ids[:n], "labels": labels[:n]} if kept else dict(EMPTY)
    return {**out, "truncated": int(len(ids) > n)}


def _is_label(v) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v != "")


def _check_alpaca(row, data: DataSection) -> str | None:
    missing = [f for f in ("instruction", "output") if not isinstance(row, dict) or not isinstance(row.get(f), str)]
    return f"lacks the text field(s) {missing} of the alpaca format" if missing else None


def _check_chat(row, data: DataSection) -> str | None:
    msgs = row.get(data.messages_field)
    role, content = data.role_field, data.content_field
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(
            isinstance(m, dict) and isinstance(m.get(role), str) and isinstance(m.get(content), str) for m in msgs
        )
    ):
        return (
            f"lacks {data.messages_field!r} as a list of {{{role!r}: str, {content!r}: str}} "
            "(data.messages_field, data.role_field, data.content_field; chat format)"
        )
    if data.train_turns != "all" and not any(m["role"] == "assistant" for m in chat_messages(row, data)):
        return (
            f"has no assistant turn in {data.messages_field!r} (roles {sorted({m[role] for m in msgs})}, "
            f"data.role_map={data.role_map}); the chat format learns the assistant turns"
        )
    return None


def _check_text(row, data: DataSection) -> str | None:
    if not isinstance(row.get(data.text_field), str):
        return f"lacks the text field {data.text_field!r} (data.text_field, {data.format} format)"
    return None


def _check_classification(row, data: DataSection) -> str | None:
    problem = _check_text(row, data)
    if problem is None and not _is_label(row.get(data.label_field)):
        return (
            f"lacks the label field {data.label_field!r} as an integer or a non-empty string (data.label_field, "
            "classification format)"
        )
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
        raise ConfigError(f"data.label_field={data.label_field!r}: the training rows mix integer and string labels")
    if len(values) < 2:
        raise ConfigError(
            f"data.path: the training rows have {len(values)} distinct value(s) of data.label_field="
            f"{data.label_field!r}; classification needs at least 2"
        )
    return sorted(values)


def chat_messages(row: dict, data: DataSection) -> list[dict]:
    """The row's conversation as [{"role", "content"}], roles mapped by data.role_map (ShareGPT: from/value)."""
    return [
        {"role": data.role_map.get(m[data.role_field], m[data.role_field]), "content": m[data.content_field]}
        for m in row[data.messages_field]
    ]


def chat_template(data: DataSection) -> str | None:
    """data.chat_template as a Jinja string (read from the file it names), checked to parse; None if not set."""
    value = data.chat_template
    if value is None:
        return None
    from pathlib import Path

    import jinja2

    looks_jinja = "{{" in value or "{%" in value
    try:
        path = None if looks_jinja else Path(value)
        if path is not None and not path.is_file():
            raise ConfigError(
                f"data.chat_template={value!r} is neither a file nor a Jinja template (no {{{{ or "
                "{%); give the template text or the path of a file that holds it"
            )
        text = path.read_text(encoding="utf-8") if path is not None else value
    except OSError as e:
        raise ConfigError(f"data.chat_template={value!r}: cannot be read ({e})") from None
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"data.chat_template ({'file ' + value if path else 'string'}): not a valid Jinja "
            f"template: {e.message} (line {e.lineno})"
        ) from None
    return text


def _chat_ids(tokenizer, messages, max_length: int, train_turns: str = "assistant") -> dict:
    """Ids of the rendered conversation, labels on the assistant turns (all, or the last) or on every token.

    The assistant tokens are found by rendering prefixes: the render of turns 1..i (with the generation prompt)
    and of turns 1..i+1 must each be the start of the whole conversation's render; a template that rewrites
    earlier turns (e.g. drops past reasoning, numbers the turns from the end) is refused instead of labelling the
    wrong tokens."""

    def render(msgs, gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full_text = render(messages, False)
    full = ids(full_text)
    if train_turns == "all":
        return _fit(full, list(full), max_length, learn_one=True)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    labels = [-100] * len(full)
    for i in turns[-1:] if train_turns == "last" else turns:
        bounds = []
        for what, text in (
            (f"turns 1..{i} with the generation prompt", render(messages[:i], True)),
            (f"turns 1..{i + 1}", render(messages[: i + 1], False)),
        ):
            if not full_text.startswith(text):
                raise ConfigError(
                    f"the chat template (data.chat_template, or the tokenizer's): the render of {what} of "
                    f"{len(messages)} is not a prefix of the whole conversation's render, so the assistant tokens "
                    "cannot be located (the template rewrites earlier turns). Give data.chat_template a template "
                    "that renders each turn the same whatever follows, or use data.train_turns=all"
                )
            piece = ids(text)
            if full[: len(piece)] != piece:
                raise ConfigError(
                    f"the chat template's render of {what} tokenizes differently alone and inside the whole "
                    "conversation (a token spans the turn boundary), so the assistant tokens cannot be located; "
                    "end turns with a special token in data.chat_template, or use data.train_turns=all"
                )
            bounds.append(len(piece))
        labels[bounds[0] : bounds[1]] = full[bounds[0] : bounds[1]]
    return _fit(full, labels, max_length)


def _alpaca_prompt(tokenizer, row: dict) -> str:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    block = f"### Input:\n{row['input']}\n\n" if row.get("input") else ""
    return ALPACA_PROMPT.format(instruction=row["instruction"], input_block=block)


def _tokenize_alpaca(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    prompt = tokenizer(_alpaca_prompt(tokenizer, row), add_special_tokens=False)["input_ids"]
    answer = tokenizer(row["output"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return _fit(prompt + answer, [-100] * len(prompt) + answer, data.max_length)


def _tokenize_chat(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    return _chat_ids(tokenizer, chat_messages(row, data), data.max_length, data.train_turns)


def _tokenize_text(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    ids = tokenizer(row[data.text_field] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    return _fit(ids, list(ids), data.max_length, learn_one=True)  # the first token is never predicted


def _tokenize_classification(tokenizer, row: dict, data: DataSection, labels: list | None) -> dict:
    n = data.max_length
    value = row[data.label_field]
    if value not in labels:
        raise ConfigError(
            f"label {value!r} (data.label_field={data.label_field!r}) is not among the training file's labels {labels}"
        )
    ids = tokenizer(row[data.text_field])["input_ids"]
    if len(ids) > n:  # tokenized again with truncation: the tokenizer keeps its special tokens at the end
        return {
            "input_ids": tokenizer(row[data.text_field], truncation=True, max_length=n)["input_ids"],
            "labels": labels.index(value),
            "truncated": 1,
        }
    return {"input_ids": ids, "labels": labels.index(value), "truncated": 0}


def tokenize_row(tokenizer, row: dict, data: DataSection, labels: list | None = None) -> dict:
    """{"input_ids": [...], "labels": [...] per token, or the class id for classification, "truncated": 0 or 1}."""
    return FORMATS[data.format].tokenize(tokenizer, row, data, labels)


def pack(examples, max_length: int):
    """Whole examples, in order, greedily into blocks of at most max_length tokens; an example is never cut (each is
    at most max_length already: truncated when tokenized). A block holds the examples' tokens and labels back to
    back and `seq_lens`, their lengths, from which the Collator makes position ids restarting per example and
    per-example attention isolation. Each example's first label is set to -100, as transformers'
    DataCollatorWithFlattening does: alone, that label is never predicted (nothing precedes it), and in a block it
    would be predicted from the previous example.

    The blocks are a view (examples.Packed): only where each block starts is kept, computed from the examples'
    lengths (read from the arrow columns of the token cache; about 0.3 s per million examples), and a block's tokens
    are read from the examples when the block is; so packing never copies the training set, and the token cache
    does not depend on data.packing."""
    from .examples import Packed, lengths

    sizes = lengths(examples)
    if len(sizes) and int(sizes.max()) > max_length:
        raise ValueError(f"pack: an example of {int(sizes.max())} tokens is longer than max_length={max_length}")
    starts, filled = [0], 0
    for i, n in enumerate(sizes.tolist()):
        if filled and filled + n > max_length:
            starts.append(i)
            filled = 0
        filled += n
    if len(sizes):
        starts.append(len(sizes))
    return Packed(examples, np.asarray(starts, np.int64))


TOKEN_FIELDS = (  # the data settings that change a split's tokens: the token cache's key (fishds/tokens.py)
    "format",
    "text_field",
    "label_field",
    "messages_field",
    "role_field",
    "content_field",
    "role_map",
    "train_turns",
    "max_length",
)


@dataclass(frozen=True)
class Format:
    check: Callable  # (row, data) -> None, or what is wrong with the row
    tokenize: Callable  # (tokenizer, row, data, labels) -> {"input_ids", "labels", "truncated"} (EMPTY: dropped)
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

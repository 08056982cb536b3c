"""Data inputs and formats (no DeepSpeed): file types, chat / text / classification rows, packing, caching."""

from __future__ import annotations

import json

import pytest

from fishds.config import ConfigError, DataSection
from fishds.model import load_tokenizer
from fishds.run.data import Collator, load_examples, read_rows
from fishds.run.formats import label_list, pack, tokenize_row

ROWS = [
    {"text": "good movie", "label": 1},
    {"text": "awful plot, slow", "label": 0},
    {"text": 'fine "quoted" story', "label": 1},
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def _write_all_types(root):
    import datasets
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "d.json").write_text(json.dumps(ROWS))
    pd.DataFrame(ROWS).to_csv(root / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(root / "d.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(root / "folder"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(root / "dict"))
    return ["d.jsonl", "d.json", "d.csv", "d.parquet", "folder", "dict"]


def test_every_file_type_reads_the_same_rows(tmp_path):
    data = DataSection(path="x", format="classification")
    for name in _write_all_types(tmp_path):
        assert read_rows(tmp_path / name, "data.path", data) == ROWS, name
    # a DatasetDict folder: data.path takes "train", data.test_path "test"
    assert read_rows(tmp_path / "dict", "data.test_path", data) == ROWS[:1]
    with pytest.raises(
        ConfigError, match=r"data.eval_path=.*splits \['other', 'train'\], none of \['validation', 'test'\]"
    ):
        import datasets

        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(ROWS), "other": datasets.Dataset.from_list(ROWS)}
        ).save_to_disk(str(tmp_path / "dict2"))
        read_rows(tmp_path / "dict2", "data.eval_path", data)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("d.txt", "unknown file type '.txt'"),
        ("plain_folder", "is a folder but not one saved by datasets"),
        ("bad.csv", "row 1 lacks the label field 'label'"),
    ],
)
def test_unreadable_inputs_name_the_key(tmp_path, name, expected):
    (tmp_path / "plain_folder").mkdir()
    (tmp_path / "d.txt").write_text("hello")
    (tmp_path / "bad.csv").write_text("text,other\nhello,1\n")
    with pytest.raises(ConfigError, match="data.path=") as e:
        read_rows(tmp_path / name, "data.path", DataSection(path="x", format="classification"))
    assert expected in str(e.value)


def test_label_lists():
    data = DataSection(path="x", format="classification")
    assert label_list([{"label": "b"}, {"label": "a"}, {"label": "b"}], data) == ["a", "b"]
    assert label_list([{"label": 2}, {"label": 0}], data) == [0, 2]
    with pytest.raises(ConfigError, match="mix integer and string"):
        label_list([{"label": 1}, {"label": "a"}], data)
    with pytest.raises(ConfigError, match="at least 2"):
        label_list([{"label": 1}, {"label": 1}], data)


def test_chat_loss_only_on_assistant_turns(toy):
    tok = load_tokenizer(toy["model"])
    tok.chat_template = CHAT_TEMPLATE
    data = DataSection(path="x", format="chat", max_length=128)
    msgs = [
        {"role": "user", "content": "label the review good movie"},
        {"role": "assistant", "content": "fresh"},
        {"role": "user", "content": "label the review awful plot"},
        {"role": "assistant", "content": "rotten"},
    ]
    e = tokenize_row(tok, {"messages": msgs}, data)
    learned = [i for i, l in zip(e["input_ids"], e["labels"]) if l != -100]
    assert tok.decode(learned).split() == ["fresh", "</s>", "rotten", "</s>"]
    assert len(e["input_ids"]) == len(e["labels"])
    # a max_length that cuts off every assistant token leaves nothing to learn: the example is dropped
    assert tokenize_row(tok, {"messages": msgs}, DataSection(path="x", format="chat", max_length=9))["input_ids"] == []


def test_chat_without_template_is_refused(toy, tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    with pytest.raises(ConfigError, match="data.format=chat needs a tokenizer with a chat template"):
        load_examples(
            load_tokenizer(toy["model"]),
            str(f),
            "data.path",
            DataSection(path=str(f), format="chat"),
            None,
            cache=tmp_path / "cache",
        )


def test_text_format_and_packing(toy, tmp_path):
    tok = load_tokenizer(toy["model"])
    rows = [{"text": " ".join(["good movie plot"] * n)} for n in range(1, 12)]
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = load_examples(
        tok, str(f), "data.path", DataSection(path=str(f), format="text", max_length=16), None, cache=tmp_path / "c"
    )
    assert all(e["labels"] == e["input_ids"] for e in plain)  # causal LM loss on every token
    assert len(plain) == len(rows) and max(len(e["input_ids"]) for e in plain) == 16  # truncated
    packed = pack(plain, 16)
    assert all(len(e["input_ids"]) <= 16 for e in packed) and len(packed) < len(plain)
    assert sum(len(e["input_ids"]) for e in packed) == sum(len(e["input_ids"]) for e in plain)
    # pack keeps whole examples in order (never cut), their lengths in seq_lens, each first label -100
    examples = [
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
        {"input_ids": [4, 5], "labels": [4, 5]},
        {"input_ids": [6, 7, 8], "labels": [6, 7, 8]},
    ]
    assert pack(examples, 5) == [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "seq_lens": [3, 2]},
        {"input_ids": [6, 7, 8], "labels": [-100, 7, 8], "seq_lens": [3]},
    ]


def test_classification_examples_and_collation(toy, tmp_path):
    tok = load_tokenizer(toy["model"])
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": r["text"], "label": ["neg", "pos"][r["label"]]}) + "\n" for r in ROWS))
    data = DataSection(path=str(f), format="classification")
    ex = load_examples(tok, str(f), "data.path", data, None, ["neg", "pos"], cache=tmp_path / "c")
    assert [e["labels"] for e in ex] == [1, 0, 1]
    batch = Collator(tok.pad_token_id)(ex)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["input_ids"].shape[0] == 3
    with pytest.raises(ConfigError, match=r"label 'pos' .* not among the training file's labels \['a', 'b'\]"):
        tokenize_row(tok, {"text": "x", "label": "pos"}, data, ["a", "b"])


def test_tokenisation_is_cached_and_keyed_by_content(toy, tmp_path, monkeypatch):
    import fishds.run.data

    tok = load_tokenizer(toy["model"])
    data = DataSection(path=toy["train"], max_length=64)
    first = load_examples(tok, toy["train"], "data.path", data, 20, cache=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.arrow"))) == 1

    def boom(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(fishds.run.data, "tokenize_row", boom)
    assert load_examples(tok, toy["train"], "data.path", data, 20, cache=tmp_path / "c") == first
    changed = tmp_path / "changed.jsonl"
    changed.write_text(open(toy["train"]).read().replace("fresh", "rotten", 1))
    with pytest.raises(AssertionError, match="tokenized again"):  # new content -> new fingerprint
        load_examples(tok, str(changed), "data.path", data, 20, cache=tmp_path / "c")
    with pytest.raises(AssertionError, match="tokenized again"):  # new settings -> new fingerprint
        load_examples(
            tok, toy["train"], "data.path", DataSection(path=toy["train"], max_length=32), 20, cache=tmp_path / "c"
        )


@pytest.mark.parametrize(
    "fields,expected",
    [
        (
            {"packing": True, "format": "classification"},
            "data.packing=true does not apply to data.format=classification",
        ),
        ({"eval_split": 0.1, "eval_path": "e.jsonl"}, "data.eval_split and data.eval_path are both set"),
    ],
)
def test_contradicting_data_settings(fields, expected):
    with pytest.raises(ValueError, match=expected):
        DataSection(path="x", **fields)

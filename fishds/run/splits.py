"""Where a split's rows come from: a data path (plus data.subset, data.split, data.data_files) resolved to the files
of one split, and those files opened with `datasets` as a memory-mapped table of raw rows.

A data path is one of
- a file: .jsonl, .json, .csv, .parquet, .arrow (also .gz / .zst / .bz2 / .xz compressed): one split, 'train';
- a glob of such files ('/data/shards/*.parquet'): the files of one split, 'train';
- a folder written by `datasets.Dataset.save_to_disk` (a DatasetDict folder: its wanted split);
- a dataset folder laid out as on the Hub (a README.md `configs:` list, or file names that say the split:
  train-00000-of-00004.parquet, data/validation.jsonl, ...), or a Hugging Face Hub dataset name org/name.
  `datasets.load_dataset_builder` resolves data.subset and data.data_files to each split's files without reading
  them, and only the wanted split's files are opened (downloaded, for the Hub). Offline (HF_HUB_OFFLINE=1), a Hub
  name is read from its snapshot in the local Hugging Face cache (HF_HUB_CACHE), as `huggingface-cli download`
  leaves it.

Each file is opened with the `datasets` builder of its type (parquet, csv, json, arrow); JSON lines files are read
with the `text` builder, one row per line (blank lines included), so a row's number is its line number and a line
that is not a JSON object is reported as such by the row check rather than failing the whole file. `datasets`
writes the raw table once to an arrow file under the fishds cache (``datasets/``) and memory-maps it: no rank
holds the rows in Python objects. `open_split` is called by the rank that tokenises (fishds/tokens.py).
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError, DataSection

COMPRESSED = (".gz", ".zst", ".bz2", ".xz")
BUILDERS = {".jsonl": "text", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
ROLE_OF_KEY = {"data.eval_path": "eval", "data.test_path": "test"}  # anything else: a training source
DEFAULT_SPLITS = {"train": ["train"], "eval": ["validation", "test"], "test": ["test"]}
SPLIT_FIELD = {"train": "data.split", "eval": "data.eval_split_name", "test": "data.test_split_name"}
SPLIT_SPEC = re.compile(r"^([A-Za-z0-9_][A-Za-z0-9_.-]*)(\[[^\]]*\])?$")


def _suffix(name: str) -> str:
    """.jsonl of x.jsonl.gz; '' for an unknown type."""
    n = name.lower()
    for c in COMPRESSED:
        if n.endswith(c):
            n = n[: -len(c)]
    return next((s for s in BUILDERS if n.endswith(s)), "")


def _is_saved(p: Path) -> bool:
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()


def _is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def default_num_proc() -> int:
    """min(8, the CPUs this process may use)."""
    return min(8, len(os.sched_getaffinity(0)))


def check_num_proc(data: DataSection) -> int:
    """data.num_proc, or its default; ConfigError above the CPUs available."""
    cpus = len(os.sched_getaffinity(0))
    if data.num_proc is not None and data.num_proc > cpus:
        raise ConfigError(
            f"data.num_proc={data.num_proc} is above the {cpus} CPUs this process may use; lower it, or leave it "
            f"unset for min(8, CPUs) = {default_num_proc()}"
        )
    return data.num_proc or default_num_proc()


@dataclass
class SplitSource:
    """One split of a data path, resolved to its files (nothing read yet)."""

    key: str  # the config key, for messages: data.path, data.eval_path, data.datasets[1].path, ...
    path: str  # as given
    kind: str  # file | glob | saved | repo
    split: str  # the split name
    slicing: str = ""  # '[:5%]' or ''
    builder: str = ""  # the datasets builder of the files (text = JSON lines)
    files: list[str] = field(default_factory=list)  # the split's data files (local paths or hf:// URLs)
    root: str = ""  # saved: the split's folder; repo: what load_dataset_builder was given
    subset: str | None = None
    hub: bool = False  # files are a Hub snapshot's or hf:// URLs (identified by their revision, not hashed)

    @property
    def json_lines(self) -> bool:
        return self.builder == "text"

    def where(self) -> str:
        """'data.path='x'' for messages."""
        return f"{self.key}={self.path!r}"

    def identity(self) -> str:
        """What the rows depend on, for cache keys: the content of local files (sha256), the revision-pinned names
        and sizes of Hub files (a Hub snapshot holds its commit in its path, hf:// URLs in theirs)."""
        h = hashlib.sha256(f"{self.kind}|{self.builder}|{self.split}|{self.slicing}|{self.subset}".encode())
        files = self.files
        if self.kind == "saved":
            files = sorted(str(f) for f in Path(self.root).rglob("*") if f.is_file())
        for f in files:
            h.update(Path(f).name.encode() if not self.hub else f.encode())
            if self.hub:
                h.update(str(os.path.getsize(f) if os.path.exists(f) else "").encode())
                continue
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()


def role_of(key: str) -> str:
    return ROLE_OF_KEY.get(key, "train")


def _split_spec(data: DataSection, role: str) -> tuple[list[str], str, str, bool]:
    """(candidate split names, slicing, the field that sets it, whether it was set)."""
    fld = SPLIT_FIELD[role]
    spec = {"train": data.split, "eval": data.eval_split_name, "test": data.test_split_name}[role]
    if spec is None:
        return DEFAULT_SPLITS[role], "", fld, False
    m = SPLIT_SPEC.match(spec.replace(" ", ""))
    if not m:
        raise ConfigError(
            f"{fld}={spec!r} is not a split: give a split name with optional slicing, e.g. 'train', 'train[:5%]', "
            "'validation[100:300]'"
        )
    return [m.group(1)], m.group(2) or "", fld, True


def _hub_root(name: str, key: str) -> tuple[str, bool]:
    """What load_dataset_builder reads for a Hub name: the name itself online, its local snapshot offline."""
    from huggingface_hub import constants

    from ..hub import snapshot

    if not constants.HF_HUB_OFFLINE:
        return name, False
    return str(snapshot(name, "dataset", key)), True


def _local_snapshot(name: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the local cache
        return None


def resolve(path: str, key: str, data: DataSection) -> SplitSource:
    """The split of `path` that `key` reads (data.path: data.split, default train; data.eval_path: validation,
    else test; data.test_path: test), resolved to its files; ConfigError naming the field when it has none.
    `data`: the source's settings (a data.datasets entry's subset, split and data_files are its own)."""
    from ..hub import is_hub_name

    role = role_of(key)
    names, slicing, fld, explicit = _split_spec(data, role)
    subset, data_files = data.subset, data.data_files
    p = Path(path)
    where = f"{key}={path!r}"
    if p.is_file():
        suffix = _suffix(p.name)
        if not suffix:
            raise ConfigError(
                f"{where}: unknown file type {p.suffix!r}; use one of {list(BUILDERS)} (optionally compressed: "
                f"{list(COMPRESSED)}), a glob of them, or a folder saved by datasets"
            )
        if p.stat().st_size == 0:
            raise ConfigError(f"{where}: the file is empty")
        return _single(path, key, "file", [str(p)], BUILDERS[suffix], names, slicing, fld, explicit)
    if _is_glob(path) and not p.exists():
        files = sorted(f for f in globlib.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise ConfigError(f"{where}: no file matches the glob; check the pattern")
        kinds = {_suffix(f) for f in files}
        if len(kinds) != 1 or "" in kinds:
            raise ConfigError(
                f"{where}: the glob matches files of types {sorted(Path(f).suffix for f in files)[:6]}; "
                f"make it match one type of {list(BUILDERS)}"
            )
        return _single(path, key, "glob", files, BUILDERS[kinds.pop()], names, slicing, fld, explicit)
    if p.is_dir() and _is_saved(p):
        return _saved(path, key, p, names, slicing, fld)
    if p.is_dir() or is_hub_name(path):
        root, hub = (str(p), False) if p.is_dir() else _hub_root(path, key)
        try:
            return _repo(path, key, root, hub, subset, data_files, names, slicing, fld)
        except ConfigError as e:
            local = _local_snapshot(path) if root == path and "not available" in str(e) else None
            if local is None:  # online and the Hub unreachable: its snapshot in the local cache, if there
                raise
            return _repo(path, key, local, True, subset, data_files, names, slicing, fld)
    raise ConfigError(f"{where}: file not found")


def _single(path, key, kind, files, builder, names, slicing, fld, explicit) -> SplitSource:
    if explicit and names[0] != "train":
        raise ConfigError(
            f"{fld}={names[0]!r}: {key}={path!r} is a file (or glob), whose one split is 'train'; set {fld} to "
            f"'train' with optional slicing, or leave it unset"
        )
    return SplitSource(key, path, kind, "train", slicing, builder, files)


def _saved(path, key, p: Path, names, slicing, fld) -> SplitSource:
    import json

    if (p / "dataset_dict.json").is_file():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        split = next((s for s in names if s in splits), None)
        if split is None:
            raise ConfigError(
                f"{key}={path!r}: the saved DatasetDict has splits {sorted(splits)}, none of {names}; set {fld} to "
                f"one of them, or give the split's own folder ({path}/<split>)"
            )
        return SplitSource(key, path, "saved", split, slicing, root=str(p / split))
    return SplitSource(key, path, "saved", "train", slicing, root=str(p))


def _repo(path, key, root, hub, subset, data_files, names, slicing, fld) -> SplitSource:
    import datasets

    where = f"{key}={path!r}"
    datasets.disable_progress_bars()
    try:
        builder = datasets.load_dataset_builder(root, subset, data_files=data_files, cache_dir=str(raw_cache()))
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "BuilderConfig" in msg and "not found" in msg:
            raise ConfigError(
                f"data.subset={subset!r}: {where} has no such configuration ({msg}); set data.subset to one of them"
            ) from None
        if "Config name is missing" in msg:
            raise ConfigError(f"data.subset: {where} has several configurations; choose one ({msg})") from None
        raise ConfigError(f"{where}: cannot be resolved to data files ({type(e).__name__}: {msg})") from None
    except FileNotFoundError as e:
        if Path(root).is_dir() and not hub:
            raise ConfigError(
                f"{where} is a folder but not one saved by datasets (save_to_disk), and holds no data file datasets "
                f"reads ({str(e).splitlines()[0]}); give a file, a glob, or choose its files with data.data_files"
            ) from None
        raise ConfigError(
            f"{where}: no data files found ({str(e).splitlines()[0]}); check data.data_files, or give a file"
        ) from None
    except Exception as e:  # noqa: BLE001 - network, permissions, ...: the dataset is not available
        raise ConfigError(
            f"{where}: the dataset is not available ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            "); download it (huggingface-cli download --repo-type dataset) or give a local path"
        ) from None
    available = dict(builder.config.data_files or {})
    split = next((s for s in names if s in available), None)
    if split is None:
        raise ConfigError(
            f"{fld}={names[0] if len(names) == 1 else None!r}: {where}"
            f"{'' if subset is None else f' (data.subset={subset!r})'} has the splits {sorted(available)}, none of "
            f"{names}; set {fld} to one of them"
        )
    files = [str(f) for f in available[split]]
    kinds = {_suffix(f) for f in files}
    if len(kinds) != 1 or "" in kinds:
        raise ConfigError(
            f"{where}: the {split!r} split has files of types {sorted({Path(f).suffix for f in files})}; "
            f"choose files of one type of {list(BUILDERS)} with data.data_files"
        )
    return SplitSource(
        key, path, "repo", split, slicing, BUILDERS[kinds.pop()], files, root, subset, hub or not Path(root).is_dir()
    )


def check_path(path: str, key: str, data: DataSection) -> None:
    """The cheap part of `resolve`, for preflight on every rank: a local path, glob or folder and its split, a Hub
    name's snapshot offline. Online, a Hub name is resolved by the first rank only (one Hub query per run)."""
    from huggingface_hub import constants

    from ..hub import is_hub_name

    if is_hub_name(path) and not constants.HF_HUB_OFFLINE:
        return
    resolve(path, key, data)


def raw_cache() -> Path:
    """Where `datasets` keeps the raw tables it reads (under the fishds cache)."""
    from ..assets import cache_dir

    return cache_dir() / "datasets"


def _load_files(src: SplitSource, files: list[str], num_proc: int | None = None):
    import datasets
    from datasets.utils import logging as dlog

    kwargs = {"keep_default_na": False} if src.builder == "csv" else {}
    level = dlog.get_verbosity()
    dlog.set_verbosity(dlog.CRITICAL)  # a file that fails is reported once, by open_split, naming the field
    try:
        return datasets.load_dataset(
            src.builder,
            data_files={"train": files},
            split="train",
            cache_dir=str(raw_cache()),
            num_proc=num_proc if num_proc and len(files) > 1 else None,
            **kwargs,
        )
    finally:
        dlog.set_verbosity(level)


@dataclass
class OpenSplit:
    """The raw rows of a split, memory-mapped; `start` is the row of the split where the slice starts."""

    source: SplitSource
    dataset: object  # datasets.Dataset
    start: int = 0
    _offsets: list[int] | None = None

    def where_row(self, i: int) -> str:
        """'data.path='x': row 12' for row i of the slice (0-based); a JSON lines row is its line number; a split
        of several files names the file and the row in it."""
        src, n = self.source, self.start + i
        if src.kind == "saved" or len(src.files) <= 1:
            return f"{src.where()}: row {n + 1}"
        if self._offsets is None:  # on errors only: each file's rows, read again one file at a time
            counts = [len(_load_files(src, [f])) for f in src.files]
            self._offsets = [sum(counts[:j]) for j in range(len(counts))]
        j = bisect_right(self._offsets, n) - 1
        return f"{src.where()}: {src.files[j]} row {n - self._offsets[j] + 1}"


def open_split(src: SplitSource, num_proc: int | None = None) -> OpenSplit:
    """The split's rows as a memory-mapped datasets.Dataset (sliced by its slicing); ConfigError naming the key and
    the file when a file does not parse or the split is empty."""
    import datasets

    datasets.disable_progress_bars()
    where = src.where()
    if src.kind == "saved":
        try:
            ds = datasets.load_from_disk(src.root)
        except Exception as e:  # noqa: BLE001 - a damaged folder is bad input
            raise ConfigError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None
    else:
        try:
            ds = _load_files(src, src.files, num_proc)
        except Exception as first:  # noqa: BLE001 - find the file that fails, to name it
            bad, why = None, first
            if len(src.files) > 1:
                for f in src.files:
                    try:
                        _load_files(src, [f])
                    except Exception as e:  # noqa: BLE001
                        bad, why = f, e
                        break
            cause = why.__cause__ or why
            bad = bad or (src.files[0] if len(src.files) == 1 else None)
            what = f"the file {bad}" if bad else "a file"
            raise ConfigError(
                f"{where}: {what} cannot be read as {src.builder if src.builder != 'text' else 'JSON lines'} "
                f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); fix or replace it, "
                "or leave it out with data.data_files"
            ) from None
    if len(ds) == 0:
        raise ConfigError(f"{where}: the file is empty")
    start = 0
    if src.slicing:
        try:
            (part,) = datasets.ReadInstruction.from_spec(f"{src.split}{src.slicing}").to_absolute({src.split: len(ds)})
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{SPLIT_FIELD[role_of(src.key)]}: {src.split}{src.slicing!s} ({e})") from None
        start = part.from_
        ds = ds.select(range(part.from_, part.to))  # a contiguous range: a view, nothing copied
        if len(ds) == 0:
            raise ConfigError(f"{where}: the slice {src.split}{src.slicing} holds no rows; widen it")
    return OpenSplit(src, ds, start)

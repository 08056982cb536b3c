"""The token cache: each data split checked and tokenised once, by `datasets.map` in data.num_proc processes, into
one arrow file that every rank memory-maps.

An entry is ``<root>/<key>.arrow`` with its record ``<key>.json`` (size, sha256 and row count of the arrow file,
fishds/cache.py) and its lock ``<key>.lock``. The key (`TokenCache.key`) covers what changes the split's tokens and
nothing else: the split's rows (the content of local files; the revision-pinned names of Hub files; the subset,
split and slicing), the data settings of formats.TOKEN_FIELDS, the chat template's text, the row limit, the
classification labels and the tokenizer. data.packing, data.eval_path, data.num_proc and the other splits' settings
are not in it: changing them reuses every cached split (packing is a view over the cached examples,
fishds/run/formats.pack).

Building an entry (`TokenCache.build`): under the entry's lock (another process that built it meanwhile is reused),
the raw split is opened (fishds/run/splits.py: a memory-mapped table), every row is checked against data.format and
tokenised by `datasets.map(num_proc)`, the shards datasets writes are joined into one arrow file under a temporary
name, renamed into place and recorded last. A row that fails its check is reported after the map with the file and
row it came from (the first failing row, whatever num_proc). An entry whose file no longer matches its record is
rebuilt. Cost: one pass over the split by num_proc processes, the arrow file on disk (about 4 bytes per token plus
8 per label), no Python object per row kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import cache as fcache
from .config import ConfigError, DataSection

CACHE_VERSION = "fishds-data-4"
MIN_ROWS_PER_PROC = 1000  # fewer rows than this per process: fewer processes (starting one costs more)


def default_root() -> Path:
    from .assets import cache_dir

    return cache_dir() / "tokenized"


def tokenizer_identity(tokenizer) -> list:
    """A cheap identity of a tokenizer: its class, size, chat template, special tokens and first 2,000 entries."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000])
    return [
        type(tokenizer).__name__,
        len(tokenizer),
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token,
        tokenizer.pad_token,
        vocab,
    ]


class TokenCache:
    """Checked, tokenised splits under `root` (default ``$FISHDS_CACHE/tokenized``), built by `num_proc` processes.

    `load` returns the usable examples (some target token left) as a memory-mapped view (run/examples.ArrowExamples)
    and fills `counts` with {"rows", "truncated", "dropped"}; `build` only makes sure the entry exists (preprocess).
    The caller coordinates ranks (fishds/run/data.py load_split): one process builds, the others open the file.
    """

    def __init__(self, tokenizer, row_tokenizer, root: Path | None = None, num_proc: int | None = None):
        """row_tokenizer: the `datasets.map` function class (run/data.RowTokenizer) that checks and tokenises rows,
        called as row_tokenizer(tokenizer, data, labels, json_lines, check_only=...)."""
        self.tokenizer, self.root, self.num_proc = tokenizer, Path(root or default_root()), num_proc or 1
        self.row_tokenizer = row_tokenizer

    def key(self, src, data: DataSection, limit: int | None, labels: list | None) -> str:
        """The entry of split `src` (splits.SplitSource) tokenised with these settings."""
        from .run.formats import TOKEN_FIELDS, chat_template

        h = hashlib.sha256(CACHE_VERSION.encode())
        h.update(src.identity().encode())
        settings = {k: getattr(data, k) for k in TOKEN_FIELDS}
        h.update(
            json.dumps(
                [settings, chat_template(data), limit, labels, tokenizer_identity(self.tokenizer)],
                sort_keys=True,
                default=str,
            ).encode()
        )
        return h.hexdigest()[:24]

    def file(self, key: str) -> Path:
        return self.root / f"{key}.arrow"

    def read(self, key: str) -> tuple[object | None, str | None]:
        """The cached dataset of `key`, memory-mapped (None if absent or failing its record), and what failed."""
        import datasets

        arrow, record = self.file(key), self.file(key).with_suffix(".json")
        if not record.is_file():
            return None, None
        try:
            rec = json.loads(record.read_text())
            if arrow.stat().st_size != rec["size"]:
                return None, f"{arrow.name} is {arrow.stat().st_size} bytes, {rec['size']} were written"
            ds = datasets.Dataset.from_file(str(arrow))  # memory-mapped
            if len(ds) != rec["rows"]:
                return None, f"{arrow.name} holds {len(ds)} rows, {rec['rows']} were written"
            return ds, None
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is rebuilt
            return None, f"{type(e).__name__}: {e}"

    def build(self, key: str, src, data: DataSection, limit: int | None, labels: list | None) -> tuple[object, bool]:
        """The dataset of entry `key`, tokenising split `src` if no valid entry exists; (dataset, was it cached)."""
        ds, _ = self.read(key)
        if ds is not None:
            return ds, True
        with fcache.lock(self.file(key).with_suffix(".lock"), f"tokenizing {src.key}"):
            ds, problem = self.read(key)  # another process may have written it while this one waited
            if ds is not None:
                return ds, True
            if problem:
                print(f"[fishds.data] cached tokenisation of {src.key} failed its check ({problem}): rebuilding")
            return self._tokenize(key, src, data, limit, labels), False

    def procs(self, rows: int) -> int:
        return max(1, min(self.num_proc, rows // MIN_ROWS_PER_PROC))

    def _tokenize(self, key: str, src, data: DataSection, limit: int | None, labels: list | None):
        import datasets

        from .run.formats import FORMATS

        raw = self._rows(src, limit)
        n = len(raw.dataset)
        arrow = self.file(key)
        print(f"[fishds.data] tokenizing {src.key} ({n} rows) into {arrow}", flush=True)
        label_type = (
            datasets.Value("int64") if FORMATS[data.format].classification else datasets.List(datasets.Value("int64"))
        )
        features = datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": label_type,
                "truncated": datasets.Value("int8"),
                "blank": datasets.Value("int8"),
                "error": datasets.Value("string"),
            }
        )
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{key}.tmp-*"):  # of a killed process that held the lock
            stale.unlink(missing_ok=True)
        tmp = self.root / f".{key}.tmp-{os.getpid()}.arrow"
        joined = self.root / f".{key}.tmp-{os.getpid()}-joined.arrow"
        procs = self.procs(n)
        if procs > 1:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processes are the parallelism
        try:
            tok = raw.dataset.map(
                self.row_tokenizer(self.tokenizer, data, labels, src.json_lines),
                batched=True,
                features=features,
                remove_columns=raw.dataset.column_names,
                cache_file_name=str(tmp),
                num_proc=procs if procs > 1 else None,
                new_fingerprint=f"{key}-{os.getpid()}",
                desc=f"tokenizing {src.key}",
            )
            _raise_first_error(tok, raw)
            rows = len(tok)
            files = [f["filename"] for f in tok.cache_files]
            if len(files) == 1 and Path(files[0]) == tmp:
                final = tmp
            else:  # num_proc > 1: one shard per process, joined into the one file of the entry
                _join(tok, joined)
                final = joined
            del tok
            os.replace(final, arrow)
        finally:
            for f in self.root.glob(f".{key}.tmp-{os.getpid()}*"):
                f.unlink(missing_ok=True)
        fcache.write_json(arrow.with_suffix(".json"), {**fcache.file_record(arrow), "rows": rows})
        return datasets.Dataset.from_file(str(arrow))  # memory-mapped from its final name

    def _rows(self, src, limit: int | None):
        from .run.splits import open_split

        raw = open_split(src, self.num_proc)
        if limit and limit < len(raw.dataset):
            raw.dataset = raw.dataset.select(range(limit))
        return raw

    def check(self, src, data: DataSection, limit: int | None) -> list:
        """Every row of split `src` checked against data.format (ConfigError naming the first bad one); for
        classification, the distinct values of data.label_field."""
        import datasets

        raw = self._rows(src, limit)
        procs = self.procs(len(raw.dataset))
        checked = raw.dataset.map(
            self.row_tokenizer(None, data, None, src.json_lines, check_only=True),
            batched=True,
            features=datasets.Features({"label": datasets.Value("string"), "error": datasets.Value("string")}),
            remove_columns=raw.dataset.column_names,
            keep_in_memory=True,  # one short string per row, dropped when this returns
            num_proc=procs if procs > 1 else None,
            desc=f"checking {src.key}",
        )
        _raise_first_error(checked, raw)
        return [json.loads(v) for v in checked.unique("label") if v]


def kept(ds, counts: dict) -> "object":
    """The usable rows of a cached split (some target token left) as a view of its arrow file; fills `counts` with
    rows (blank JSON lines not counted), truncated (kept ones) and dropped, read from the columns."""
    import pyarrow.compute as pc

    from .run.examples import ArrowExamples

    blank = ds.data.column("blank").to_numpy().astype(bool)
    keep = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False) > 0
    cut = ds.data.column("truncated").to_numpy()
    counts.update(rows=int((~blank).sum()), truncated=int(cut[keep].sum()), dropped=int((~keep & ~blank).sum()))
    return ArrowExamples(ds, np.flatnonzero(keep))


def _raise_first_error(ds, raw) -> None:
    """The first row whose check or tokenisation failed (map's `error` column), as a ConfigError naming it."""
    import pyarrow.compute as pc

    err = ds.data.column("error")
    bad = pc.indices_nonzero(pc.not_equal(err, "")).to_numpy()
    if len(bad):
        i = int(bad.min())
        problem = err[i].as_py()
        where = raw.where_row(i)
        if problem.startswith("\x00"):  # the tokeniser's own message (chat template, label) for this row
            raise ConfigError(f"{where}: {problem[1:]}")
        raise ConfigError(f"{where} {problem}")


def _join(ds, path: Path) -> None:
    """The rows of `ds` (the shards of a multi-process map) into one arrow file, in order, batch by batch."""
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=ds.features, path=str(path)) as writer:
        for batch in ds.data.to_batches():
            writer.write_table(pa.Table.from_batches([batch]))
        writer.finalize()

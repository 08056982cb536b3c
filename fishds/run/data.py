"""Training data: local files -> checked rows -> cached token ids -> micro-batches.

Inputs (data.path, data.eval_path, data.test_path): a .jsonl / .json / .csv / .parquet file, or a folder
written by `datasets.Dataset.save_to_disk` (a DatasetDict folder: its "train" split for data.path, its
"validation" or "test" split for the others). Rows are checked for the fields of data.format before any
weights load (`read_rows`), with the row number in the message. Formats and tokenisation: fishds/run/formats.py.
Tokenisation runs once per (file content, tokenizer, settings) and is cached by `datasets` (an arrow
file under the fishds cache), rank 0 first, the other ranks read the cache. Independent runs share it: one
process tokenises while holding `<fingerprint>.lock`, writes the arrow file under a temporary name, renames it
into place and records its size, sha256 and row count in `<fingerprint>.json`; a cached file is checked
against that record when read and rebuilt if it fails.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .. import cache as fcache
from .. import dist as fdist
from ..config import ConfigError, DataSection
from .examples import ArrowExamples
from .formats import FORMATS, chat_template, check_row, tokenize_row

TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CACHE_VERSION = "fishds-data-3"


def _read_json_lines(p: Path, key: str, path) -> list[tuple[int, object]]:
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ConfigError(f"{key}={str(path)!r}: the file is empty")
    if p.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{key}={str(path)!r}: not valid JSON ({e})") from None
        return list(enumerate(rows if isinstance(rows, list) else [], start=1))
    numbered = []
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit inside a string
        if line.strip():
            try:
                numbered.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}={str(path)!r}: line {i} is not valid JSON ({e})") from None
    return numbered


def _read_datasets(p: Path, key: str, path) -> list[tuple[int, object]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                wanted = (
                    ["validation", "test"]
                    if key == "data.eval_path"
                    else ["test"]
                    if key == "data.test_path"
                    else ["train"]
                )
                split = next((s for s in wanted if s in ds), None)
                if split is None:
                    raise ConfigError(
                        f"{key}={str(path)!r}: the saved DatasetDict has splits {sorted(ds)}, none of "
                        f"{wanted}; give the split's own folder ({str(path)}/<split>)"
                    )
                ds = ds[split]
        elif p.suffix == ".csv":
            import pandas as pd

            ds = datasets.Dataset.from_pandas(pd.read_csv(p, keep_default_na=False), preserve_index=False)
        else:
            ds = datasets.Dataset.from_parquet(str(p))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise ConfigError(f"{key}={str(path)!r}: cannot be read ({type(e).__name__}: {e})") from None
    if len(ds) == 0:
        raise ConfigError(f"{key}={str(path)!r}: the file is empty")
    return list(enumerate(ds.to_list(), start=1))


def read_rows(path: str | Path, key: str, data: DataSection, limit: int | None = None) -> list[dict]:
    """Rows of a data file or `datasets` folder, each checked against data.format (no tokenizer needed)."""
    p = Path(path)
    if p.is_dir():
        if not ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
            raise ConfigError(f"{key}={str(path)!r} is a folder but not one saved by datasets (save_to_disk)")
        numbered = _read_datasets(p, key, path)
    elif not p.is_file():
        raise ConfigError(f"{key}={str(path)!r}: file not found")
    elif p.suffix in (".jsonl", ".json"):
        numbered = _read_json_lines(p, key, path)
    elif p.suffix in (".csv", ".parquet"):
        numbered = _read_datasets(p, key, path)
    else:
        raise ConfigError(
            f"{key}={str(path)!r}: unknown file type {p.suffix!r}; use one of {list(TABLE_SUFFIXES)} "
            "or a folder saved by datasets"
        )
    if limit:
        numbered = numbered[:limit]
    out = []
    for i, row in numbered:
        problem = check_row(row, data)
        if problem:
            raise ConfigError(f"{key}={str(path)!r}: row {i} {problem}")
        out.append(row)
    if not out:
        raise ConfigError(f"{key}={str(path)!r}: no rows")
    return out


def _fingerprint(path: Path, tokenizer, data: DataSection, limit, labels, split_key: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000])  # cheap identity of the tokenizer
    h.update(
        json.dumps(
            [
                data.model_dump(),
                limit,
                labels,
                split_key,
                type(tokenizer).__name__,
                len(tokenizer),
                getattr(tokenizer, "chat_template", None),
                tokenizer.eos_token,
                tokenizer.pad_token,
                vocab,
            ],
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()[:24]


def load_examples(
    tokenizer,
    path: str,
    key: str,
    data: DataSection,
    limit: int | None,
    labels: list | None = None,
    cache: Path | None = None,
    rows: list[dict] | None = None,
    counts: dict | None = None,
) -> ArrowExamples:
    """Token ids and labels of every usable row (cached; rank 0 tokenizes first, the others read its cache), as a
    sequence of {"input_ids", "labels"} over the memory-mapped, checked cache file (fishds/examples.py).
    rows: the checked rows of `path` when the caller has read them already (preflight), else they are read here.

    `counts`, when given, receives {"rows", "truncated", "dropped"}: rows read, examples data.max_length cut
    (kept), and examples dropped because no target token was left."""
    import datasets

    from ..assets import cache_dir

    template = chat_template(data)
    if template is not None:
        tokenizer.chat_template = template  # data.chat_template replaces the tokenizer's (chat, alpaca prompts)
    if FORMATS[data.format].chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"data.format=chat needs a tokenizer with a chat template, and {key}={path!r} is read with "
            "one that has none; use data.format=alpaca or text, or a model whose tokenizer has one"
        )
    counts = {} if counts is None else counts
    cache = cache or cache_dir() / "tokenized"
    cache_file = cache / f"{_fingerprint(Path(path), tokenizer, data, limit, labels, key)}.arrow"

    record_file = cache_file.with_suffix(".json")

    def read_cached() -> tuple[ArrowExamples | None, str | None]:
        """The cached examples, memory-mapped (None if absent or failing the check against their record), and what
        failed."""
        if not record_file.is_file():
            return None, None
        try:
            rec = json.loads(record_file.read_text())
            if cache_file.stat().st_size != rec["size"]:
                return None, f"{cache_file.name} is {cache_file.stat().st_size} bytes, {rec['size']} were written"
            ds = datasets.Dataset.from_file(str(cache_file))  # memory-mapped
            if len(ds) != rec["rows"]:
                return None, f"{cache_file.name} holds {len(ds)} rows, {rec['rows']} were written"
            return _kept(ds), None
        except Exception as e:  # noqa: BLE001 - an unreadable cache file is rebuilt
            return None, f"{type(e).__name__}: {e}"

    def tokenize() -> ArrowExamples:
        checked = rows if rows is not None else read_rows(path, key, data, limit)
        table = datasets.Dataset.from_list([{"row": json.dumps(r)} for r in checked])
        print(f"[fishds.data] tokenizing {key} ({len(table)} rows) into {cache_file}", flush=True)
        label_type = (
            datasets.Value("int64") if FORMATS[data.format].classification else datasets.List(datasets.Value("int64"))
        )
        features = datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "labels": label_type,
                "truncated": datasets.Value("int8"),
            }
        )
        for stale in cache.glob(f".{cache_file.stem}.tmp-*"):  # of a killed process that held the lock
            stale.unlink(missing_ok=True)
        tmp = cache / f".{cache_file.stem}.tmp-{os.getpid()}.arrow"
        try:
            tok = table.map(
                lambda r: tokenize_row(tokenizer, json.loads(r["row"]), data, labels),
                features=features,
                remove_columns=["row"],
                cache_file_name=str(tmp),
                desc=f"tokenizing {key}",
            )
            n = len(tok)
            del tok
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
        fcache.write_json(record_file, {**fcache.file_record(cache_file), "rows": n})
        return _kept(datasets.Dataset.from_file(str(cache_file)))  # memory-mapped from its final name

    def build() -> ArrowExamples:
        examples, _ = read_cached()  # the arrow file datasets' map wrote: no need to read and parse the rows again
        if examples is None:
            with fcache.lock(cache_file.with_suffix(".lock"), f"tokenizing {key}"):
                examples, problem = read_cached()  # another process may have written it while this one waited
                if examples is None:
                    if problem:
                        print(
                            f"[fishds.data] cached tokenisation of {key} failed its check ({problem}): rebuilding",
                            flush=True,
                        )
                    examples = tokenize()
        return examples

    def _kept(ds) -> ArrowExamples:
        """The usable rows (some target left) as a view of the arrow file; counts from its columns."""
        import pyarrow.compute as pc

        keep = pc.list_value_length(ds.data.column("input_ids")).to_numpy(zero_copy_only=False) > 0
        cut = ds.data.column("truncated").to_numpy()
        counts.update(rows=len(ds), truncated=int(cut[keep].sum()), dropped=int((~keep).sum()))
        return ArrowExamples(ds, np.flatnonzero(keep))

    datasets.disable_progress_bars()
    if fdist.world_size() > 1 and not fdist.is_main():
        fdist.barrier()  # rank 0 writes the cache first
        examples = build()
    else:
        try:
            examples = build()
        finally:
            if fdist.world_size() > 1:
                fdist.barrier()
    if not examples:
        what = "no response token is left to learn" if FORMATS[data.format].response_only else "no token is left"
        raise ConfigError(
            f"{key}={path!r}: every example (all {counts['rows']}) loses all its target tokens to "
            f"data.max_length={data.max_length}, so {what}; raise data.max_length"
        )
    return examples


def data_counts_line(key: str, counts: dict, max_length: int) -> str:
    """The start-of-run line: rows read, truncated and dropped examples of one data file."""
    return (
        f"[fishds] {key}: {counts['rows']:,} rows, {counts['truncated']:,} truncated to data.max_length="
        f"{max_length}, {counts['dropped']:,} dropped (no target token left)"
    )


def data_counts_report(counts: dict) -> dict:
    """fish_report.json entries: per data key, rows read, examples truncated, examples dropped."""
    return {
        "data_rows": {k: c["rows"] for k, c in counts.items()},
        "truncated_examples": {k: c["truncated"] for k, c in counts.items()},
        "dropped_examples": {k: c["dropped"] for k, c in counts.items()},
    }


class Collator:
    """Right-padded batches; per-token labels (-100 on padding) or one class label per example.

    Packed blocks (examples with `seq_lens`, from formats.pack): position ids restart at 0 for every example, and
    no token attends across an example's boundary. With a varlen-capable attention (an attn_impl naming flash),
    the position ids alone say where examples start (as transformers' DataCollatorWithFlattening gives them, no
    attention_mask); otherwise (sdpa, eager, ...) a 4-D block-diagonal causal mask [batch, 1, L, L] is passed,
    which transformers uses as given: boolean (True = attend) for sdpa, additive (0 / dtype min) in `dtype` for
    eager. The padding after the last example is one more block, so no row of the mask is empty.
    """

    def __init__(self, pad_id: int, attn_impl: str | None = "sdpa", dtype: torch.dtype = torch.float32):
        self.pad_id, self.attn_impl, self.dtype = pad_id, attn_impl or "sdpa", dtype

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), n), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(examples), n), dtype=torch.long)
        per_token = isinstance(examples[0]["labels"], list)
        labels = (
            torch.full((len(examples), n), -100, dtype=torch.long)
            if per_token
            else torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        )
        for i, e in enumerate(examples):
            L = len(e["input_ids"])
            ids[i, :L] = torch.tensor(e["input_ids"])
            attn[i, :L] = 1
            if per_token:
                labels[i, :L] = torch.tensor(e["labels"])
        if "seq_lens" in examples[0]:
            return {"input_ids": ids, "labels": labels, **self._packed(examples, n)}
        return {"input_ids": ids, "attention_mask": attn, "labels": labels}

    def _packed(self, examples: list[dict], n: int) -> dict[str, torch.Tensor]:
        """position_ids restarting per example, and (unless varlen attention) the block-diagonal causal mask."""
        pos = torch.zeros((len(examples), n), dtype=torch.long)
        seg = torch.zeros((len(examples), n), dtype=torch.long)
        for i, e in enumerate(examples):
            lens = list(e["seq_lens"]) + ([n - sum(e["seq_lens"])] if sum(e["seq_lens"]) < n else [])
            pos[i] = torch.cat([torch.arange(L) for L in lens])
            seg[i] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        if "flash" in self.attn_impl:  # flash_attention_2/3, kernels-community/flash-attn*: varlen
            return {"position_ids": pos}
        causal = torch.ones((n, n), dtype=torch.bool).tril()
        mask = (seg[:, :, None] == seg[:, None, :]) & causal  # [batch, query, key]
        mask = mask[:, None]
        if self.attn_impl != "sdpa":
            mask = torch.zeros(mask.shape, dtype=self.dtype).masked_fill(~mask, torch.finfo(self.dtype).min)
        return {"position_ids": pos, "attention_mask": mask}


class ShardedBatches:
    """Micro-batches for this rank: a seeded permutation per epoch, each global batch split by rank.

    Deterministic from (seed, position), so the same config gives the same data order.
    """

    def __init__(self, examples: list[dict], micro_batch_size: int, rank: int, world: int, seed: int):
        self.examples, self.mbs, self.rank, self.world, self.seed = examples, micro_batch_size, rank, world, seed
        self.position = 0  # micro-batches consumed by this rank

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.examples), generator=g).tolist()

    def next(self) -> list[dict]:
        per_global = self.mbs * self.world
        per_epoch = max(1, len(self.examples) // per_global)
        epoch, i = divmod(self.position, per_epoch)
        order = self._order(epoch)
        if len(order) < per_global:  # tiny data: repeat it
            order = (order * (per_global // max(1, len(order)) + 1))[:per_global]
        start = i * per_global + self.rank * self.mbs
        self.position += 1
        return [self.examples[j] for j in order[start : start + self.mbs]]

"""Training data: data paths -> checked, tokenised, cached splits -> micro-batches.

Inputs (data.path, data.datasets[i].path, data.eval_path, data.test_path): a file (.jsonl, .json, .csv, .parquet,
.arrow), a glob of shards, a folder saved by datasets, a dataset folder laid out as on the Hub, or a Hub name, with
data.subset, data.split (and data.eval_split_name, data.test_split_name) and data.data_files: fishds/run/splits.py.
The first rank checks every row against data.format and tokenises it inside `datasets.map(num_proc=data.num_proc)`
into the token cache (fishds/tokens.py), before any weights load; a bad row is reported with its file and row.
The other ranks wait for it, then memory-map the cached arrow file: no rank holds raw rows, and the examples stay
in the arrow file (run/examples.ArrowExamples). `fishds preprocess` fills the cache before a launch, which then
finds every split there and starts at once. Formats and tokenisation: fishds/run/formats.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import dist as fdist
from ..config import ConfigError, DataSection
from .examples import ArrowExamples
from .formats import FORMATS, chat_template, check_row, label_list, tokenize_row


class RowTokenizer:
    """The batched `datasets.map` function of the token cache: each row checked against data.format, then tokenised
    (formats.tokenize_row); a failing row gives its problem in column `error` (the map goes on; the first failing row
    is reported after it). JSON lines rows arrive as text (column `text`, one line each; blank lines are `blank`).
    check_only: the rows are checked and their label (JSON) returned, for the classification label list."""

    def __init__(self, tokenizer, data: DataSection, labels: list | None, json_lines: bool, check_only: bool = False):
        self.tokenizer, self.data, self.labels = tokenizer, data, labels
        self.json_lines, self.check_only = json_lines, check_only

    def _row(self, batch: dict, i: int) -> tuple[object, str, int]:
        """(row, problem or '', blank)"""
        if not self.json_lines:
            return {c: batch[c][i] for c in batch}, "", 0
        line = batch["text"][i]
        if not line.strip():
            return None, "", 1
        try:
            return json.loads(line), "", 0
        except json.JSONDecodeError as e:
            return None, f"is not valid JSON ({e})", 0

    def __call__(self, batch: dict) -> dict:
        n = len(next(iter(batch.values())))
        cls = FORMATS[self.data.format].classification
        out = {"error": []}
        out.update({"label": []} if self.check_only else {"input_ids": [], "labels": [], "truncated": [], "blank": []})
        for i in range(n):
            row, problem, blank = self._row(batch, i)
            if not problem and not blank:
                problem = check_row(row, self.data) or ""
            if self.check_only:
                ok = not (problem or blank)
                out["label"].append(json.dumps(row[self.data.label_field]) if ok and cls else "")
                out["error"].append(problem)
                continue
            ex = {"input_ids": [], "labels": 0 if cls else [], "truncated": 0}
            if not problem and not blank:
                try:
                    ex = tokenize_row(self.tokenizer, row, self.data, self.labels)
                except ConfigError as e:
                    problem = "\x00" + str(e)
            for k in ("input_ids", "labels", "truncated"):
                out[k].append(ex[k])
            out["blank"].append(blank)
            out["error"].append(problem)
        return out


def read_rows(path: str | Path, key: str, data: DataSection, limit: int | None = None) -> list[dict]:
    """The checked rows of a data path as Python dicts (small inputs, tests: training reads through the token
    cache instead)."""
    from .splits import open_split, resolve

    src = resolve(str(path), key, data)
    raw = open_split(src)
    tok = RowTokenizer(None, data, None, src.json_lines, check_only=True)
    out = []
    for i in range(min(len(raw.dataset), limit or len(raw.dataset))):
        row, problem, blank = tok._row(raw.dataset[i : i + 1], 0)
        if blank:
            continue
        problem = problem or check_row(row, data)
        if problem:
            raise ConfigError(f"{raw.where_row(i)} {problem}")
        out.append(row)
    if not out:
        raise ConfigError(f"{key}={str(path)!r}: the file is empty")
    return out


def _broadcast(obj):
    """obj of the first rank, on every rank."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0, device=fdist.comm_device())
    return box[0]


def _first_rank(work):
    """work() on the first rank, its result (or its ConfigError, raised) on every rank. work returns what the
    others receive."""
    if fdist.world_size() == 1:
        return work()
    if fdist.is_main():
        try:
            result = work()
        except ConfigError as e:
            _broadcast(("error", str(e)))
            raise
        except BaseException as e:
            _broadcast(("error", f"the first rank failed ({type(e).__name__}: {e})"))
            raise
        _broadcast(("ok", result))
        return result
    status, result = _broadcast(None)
    if status == "error":
        raise ConfigError(result)
    return result


def _chat_template_set(tokenizer, data: DataSection) -> bool:
    """data.chat_template set on the tokenizer; True when data.format needs a chat template and there is none."""
    template = chat_template(data)
    if template is not None:
        tokenizer.chat_template = template  # data.chat_template replaces the tokenizer's (chat, alpaca prompts)
    return bool(FORMATS[data.format].chat_template and not getattr(tokenizer, "chat_template", None))


def load_examples(
    tokenizer,
    path: str,
    key: str,
    data: DataSection,
    limit: int | None,
    labels: list | None = None,
    cache: Path | None = None,
    counts: dict | None = None,
    files: dict | None = None,
) -> ArrowExamples:
    """The usable examples (some target token left) of one split, as a memory-mapped view of its token cache entry
    (fishds/tokens.py). The first rank resolves the split (fishds/run/splits.py), and checks and tokenises it unless
    the cache holds it; the other ranks then open the entry it names (and build it themselves under its lock only
    when they do not see it: another machine without a shared cache folder).

    `counts`, when given, receives {"rows", "truncated", "dropped"}: rows read, examples data.max_length cut
    (kept), and examples dropped because no target token was left. `files`, when given, receives {key: (the cache
    file, whether it was there already)}."""
    import datasets

    from ..tokens import TokenCache, kept
    from .splits import check_num_proc, resolve

    datasets.disable_progress_bars()
    counts = {} if counts is None else counts
    tc = TokenCache(tokenizer, RowTokenizer, cache, check_num_proc(data))
    no_template = _chat_template_set(tokenizer, data)

    def build():
        src = resolve(path, key, data)
        if no_template:  # the rows first: a bad row is the better message
            tc.check(src, data, limit)
            raise ConfigError(
                f"data.format=chat needs a tokenizer with a chat template, and {key}={path!r} is read with "
                "one that has none; use data.format=alpaca or text, or a model whose tokenizer has one"
            )
        k = tc.key(src, data, limit, labels)
        ds, hit = tc.build(k, src, data, limit, labels)
        if files is not None:
            files[key] = (str(tc.file(k)), hit)
        return k, ds

    if fdist.world_size() > 1 and not fdist.is_main():
        k = _first_rank(lambda: None)
        ds, _ = tc.read(k)
        if ds is None:  # not visible from here (another machine): built here, under the entry's lock
            k, ds = build()
        elif files is not None:
            files[key] = (str(tc.file(k)), True)
    else:
        box = {}

        def work():
            box["k"], box["ds"] = build()
            return box["k"]

        _first_rank(work)
        ds = box["ds"]
    examples = kept(ds, counts)
    if not counts["rows"]:
        raise ConfigError(f"{key}={path!r}: the file is empty")  # blank lines only
    if not examples:
        what = "no response token is left to learn" if FORMATS[data.format].response_only else "no token is left"
        raise ConfigError(
            f"{key}={path!r}: every example (all {counts['rows']}) loses all its target tokens to "
            f"data.max_length={data.max_length}, so {what}; raise data.max_length"
        )
    return examples


def class_labels(tokenizer, sources: list, eval_splits: list, cache: Path | None = None) -> list:
    """Classification: the sorted distinct labels over the training sources (each checked row by row first), the
    same on every rank (the first rank reads them); eval_splits [(key, path, limit)] must use no other label."""
    from ..tokens import TokenCache
    from .splits import check_num_proc, resolve

    def work():
        values = []
        for s in sources:
            tc = TokenCache(tokenizer, RowTokenizer, cache, check_num_proc(s.data))
            src = resolve(s.path, s.key, s.data)
            values.append((s, tc.check(src, s.data, s.data.max_examples)))
        if len(values) == 1:
            s, vals = values[0]
            labels = label_list([{s.data.label_field: v} for v in vals], s.data)
        else:
            labels = label_list(
                [{"label": v} for _, vals in values for v in vals],
                DataSection(path="-", label_field="label", format="classification"),
            )
        d = sources[0].data
        for key, path, limit in eval_splits:
            if not path:
                continue
            tc = TokenCache(tokenizer, RowTokenizer, cache, check_num_proc(d))
            seen = tc.check(resolve(path, key, d), d, limit)
            unknown = sorted({str(v) for v in seen} - {str(v) for v in labels})
            if unknown:
                raise ConfigError(
                    f"{key}={path!r}: labels {unknown[:5]} (data.label_field={d.label_field!r}) do not "
                    f"occur in the training file, whose labels are {labels}"
                )
        return labels

    return _first_rank(work)


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

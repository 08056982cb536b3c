"""Per-rank resident memory of the tokenized training data: Python lists
(Dataset.to_list() on every rank) against the memory-mapped arrow view (fishds.run.examples.ArrowExamples).

    .venv/bin/python bench/data_rss.py [--rows 1000000] [--ranks 2] [--direct]

Writes a synthetic alpaca file of --rows rows, tokenizes it once (the fishds cache, in a temp folder; the toy
word-level tokenizer of tests/toy.py), then for each mode starts --ranks ranks (torchrun, gloo) that load the
examples from that cache, draw 200 micro-batches of 8 (ShardedBatches) and report VmRSS and the peak (VmHWM) in
MiB. One JSON line per rank and mode, then one line with the ratios; all appended to bench/results/data_rss.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    import datasets  # noqa: F401 - imported before the baseline, as a run has it

    from fishds import dist as fdist
    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import ShardedBatches, load_examples

    fdist.init_distributed()
    tok = load_tokenizer(args.model)
    before = _status_mib("VmRSS")  # after imports and the tokenizer: what remains is the data
    data = DataSection(path=args.data, max_length=64)
    t0 = time.perf_counter()
    examples = load_examples(tok, args.data, "data.path", data, None, cache=Path(args.cache))
    if args.mode == "lists":  # what load_examples returned before: every row as Python lists on every rank
        examples = [
            e
            for e in datasets.Dataset.from_file(examples.dataset.cache_files[0]["filename"]).to_list()
            if e["input_ids"]
        ]
    load_s = time.perf_counter() - t0
    loaded = _status_mib("VmRSS")
    batches = ShardedBatches(examples, 8, fdist.rank(), fdist.world_size(), 0)
    tokens = sum(len(e["input_ids"]) for _ in range(200) for e in batches.next())
    rec = {
        "bench": "data_rss",
        "mode": args.mode,
        "rank": fdist.rank(),
        "ranks": fdist.world_size(),
        "examples": len(examples),
        "rss_before_mib": round(before, 1),
        "rss_loaded_mib": round(loaded, 1),
        "rss_after_batches_mib": round(_status_mib("VmRSS"), 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
        # private memory vs mapped file pages (shared between ranks, reclaimable) after the batches
        "rss_anon_mib": round(_status_mib("RssAnon"), 1),
        "rss_file_mib": round(_status_mib("RssFile"), 1),
        "data_rss_mib": round(loaded - before, 1),
        "load_seconds": round(load_s, 2),
        "tokens_drawn": tokens,
    }
    print("RESULT " + json.dumps(rec), flush=True)
    fdist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument(
        "--direct",
        action="store_true",
        help="write synthetic token ids straight into the "
        "tokenization cache instead of tokenizing the rows (for 1M rows)",
    )
    ap.add_argument("--mode", choices=["lists", "arrow"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from toy import WORDS, make_tiny_llama

    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples

    tmp = Path(tempfile.mkdtemp(prefix="fishds-data-rss-"))
    model = make_tiny_llama(tmp / "model")
    rng = random.Random(0)
    data = tmp / "train.jsonl"
    with data.open("w") as f:
        for _ in range(args.rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            f.write(
                json.dumps(
                    {"instruction": "label the review", "input": words, "output": rng.choice(["fresh", "rotten"])}
                )
                + "\n"
            )
    t0 = time.perf_counter()
    tok, section = load_tokenizer(str(model)), DataSection(path=str(data), max_length=64)
    if args.direct:
        _write_cache_directly(tok, data, section, tmp / "cache", args.rows)
    else:
        load_examples(tok, str(data), "data.path", section, None, cache=tmp / "cache")
    tokenize_s = time.perf_counter() - t0
    results = {}
    for mode in ("arrow", "lists"):
        from bench._session import torchrun

        cmd = torchrun(
            __file__,
            args.ranks,
            [
                "--worker",
                "--mode",
                mode,
                "--model",
                str(model),
                "--data",
                str(data),
                "--cache",
                str(tmp / "cache"),
            ],
        )
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        recs = [json.loads(line[len("RESULT ") :]) for line in out.splitlines() if line.startswith("RESULT ")]
        results[mode] = recs
        for r in sorted(recs, key=lambda r: r["rank"]):
            _record({**r, "rows": args.rows, "direct": args.direct, "tokenize_once_seconds": round(tokenize_s, 1)})
    mean = {m: sum(r["data_rss_mib"] for r in rs) / len(rs) for m, rs in results.items()}
    peak = {m: max(r["peak_rss_mib"] for r in rs) for m, rs in results.items()}
    anon = {m: max(r["rss_anon_mib"] for r in rs) for m, rs in results.items()}
    _record(
        {
            "bench": "data_rss",
            "summary": True,
            "rows": args.rows,
            "ranks": args.ranks,
            "rss_anon_mib": anon,
            "data_rss_mib_per_rank": mean,
            "lists_over_arrow_data_rss": round(mean["lists"] / max(mean["arrow"], 0.1), 1),
            "peak_rss_mib_per_rank": peak,
            "lists_over_arrow_peak": round(peak["lists"] / peak["arrow"], 2),
            "command": "bench/data_rss.py " + " ".join(sys.argv[1:]),
        }
    )


def _write_cache_directly(tok, data: Path, section, cache: Path, rows: int) -> None:
    """--direct: the tokenization cache file load_examples looks for, written with synthetic token ids (16..64 per
    row, the first 12 labelled -100) straight from numpy: tokenizing 1M rows takes most of an hour on 2 cores."""
    import numpy as np
    import pyarrow as pa

    from fishds.run.data import _fingerprint

    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 65, rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = rng.integers(4, 60, int(offsets[-1])).astype(np.int32)
    labels = ids.astype(np.int64)
    starts = offsets[:-1]
    for k in range(12):
        labels[starts + k] = -100
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
            "labels": pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)),
            "truncated": pa.array(np.zeros(rows, np.int8)),
        }
    )
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{_fingerprint(data, tok, section, None, None, 'data.path')}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=10_000)


def _record(rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with (results / "data_rss.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Per-rank resident memory of the tokenized training data: Python lists (the code before issue 15 item 7:
Dataset.to_list() on every rank) against the memory-mapped arrow view (fishds.examples.ArrowExamples).

    .venv/bin/python bench/data_rss.py [--rows 1000000] [--ranks 2]

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
    from fishds import dist as fdist
    from fishds.config import DataSection
    from fishds.data import ShardedBatches, load_examples
    from fishds.model import load_tokenizer

    import datasets  # noqa: F401 - imported before the baseline, as a run has it

    fdist.init_distributed()
    tok = load_tokenizer(args.model)
    before = _status_mib("VmRSS")  # after imports and the tokenizer: what remains is the data
    data = DataSection(path=args.data, max_length=64)
    t0 = time.perf_counter()
    examples = load_examples(tok, args.data, "data.path", data, None, cache=Path(args.cache))
    if args.mode == "lists":  # what load_examples returned before: every row as Python lists on every rank
        examples = [e for e in datasets.Dataset.from_file(examples.dataset.cache_files[0]["filename"]).to_list()
                    if e["input_ids"]]
    load_s = time.perf_counter() - t0
    loaded = _status_mib("VmRSS")
    batches = ShardedBatches(examples, 8, fdist.rank(), fdist.world_size(), 0)
    tokens = sum(len(e["input_ids"]) for _ in range(200) for e in batches.next())
    rec = {"bench": "data_rss", "mode": args.mode, "rank": fdist.rank(), "ranks": fdist.world_size(),
           "examples": len(examples), "rss_before_mib": round(before, 1), "rss_loaded_mib": round(loaded, 1),
           "rss_after_batches_mib": round(_status_mib("VmRSS"), 1), "peak_rss_mib": round(_status_mib("VmHWM"), 1),
           "data_rss_mib": round(loaded - before, 1), "load_seconds": round(load_s, 2), "tokens_drawn": tokens}
    print("RESULT " + json.dumps(rec), flush=True)
    fdist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--mode", choices=["lists", "arrow"])
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--cache")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from toy import WORDS, make_tiny_llama

    from fishds.config import DataSection
    from fishds.data import load_examples
    from fishds.model import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="fishds-data-rss-"))
    model = make_tiny_llama(tmp / "model")
    rng = random.Random(0)
    data = tmp / "train.jsonl"
    with data.open("w") as f:
        for _ in range(args.rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            f.write(json.dumps({"instruction": "label the review", "input": words,
                                "output": rng.choice(["fresh", "rotten"])}) + "\n")
    t0 = time.perf_counter()
    load_examples(load_tokenizer(str(model)), str(data), "data.path", DataSection(path=str(data), max_length=64),
                  None, cache=tmp / "cache")
    tokenize_s = time.perf_counter() - t0
    results = {}
    for mode in ("lists", "arrow"):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
               __file__, "--worker", "--mode", mode, "--model", str(model), "--data", str(data),
               "--cache", str(tmp / "cache")]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        recs = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
        results[mode] = recs
        for r in sorted(recs, key=lambda r: r["rank"]):
            _record({**r, "rows": args.rows, "tokenize_once_seconds": round(tokenize_s, 1)})
    mean = {m: sum(r["data_rss_mib"] for r in rs) / len(rs) for m, rs in results.items()}
    peak = {m: max(r["peak_rss_mib"] for r in rs) for m, rs in results.items()}
    _record({"bench": "data_rss", "summary": True, "rows": args.rows, "ranks": args.ranks,
             "data_rss_mib_per_rank": mean,
             "lists_over_arrow_data_rss": round(mean["lists"] / max(mean["arrow"], 0.1), 1),
             "peak_rss_mib_per_rank": peak, "lists_over_arrow_peak": round(peak["lists"] / peak["arrow"], 2),
             "command": "bench/data_rss.py " + " ".join(sys.argv[1:])})


def _record(rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with (results / "data_rss.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

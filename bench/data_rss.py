"""The data path at scale: tokenisation wall time at data.num_proc 1 and 2, and each rank's private memory after
the whole of a run's data loading (preflight, tokenizer, fishds.run.train.load_data, 200 micro-batches drawn).

    .venv/bin/python bench/data_rss.py [--rows 1000000] [--ranks 2] [--procs 1 2]

Writes a synthetic alpaca file of --rows rows (the toy word-level tokenizer of tests/toy.py), then
1. tokenises it into an empty token cache once per --procs value (fishds.run.data.load_examples in one process, as
   the first rank or `fishds preprocess` does), timing each;
2. starts --ranks ranks (torchrun, gloo) of a run of that config on the warm cache: each runs preflight, starts the
   process group, loads the tokenizer and the data (load_data: the cache hit, the memory-mapped examples), draws
   200 micro-batches of 8 and reports its private memory (RssAnon: anonymous pages, not the mapped arrow file, which
   the ranks of a machine share and the OS can drop) and VmRSS, before and after, in MiB.
Prints the figures side by side and appends one JSON line per measurement and a summary line to
bench/results/data_rss.jsonl (appended: earlier runs stay, each line says its command and rows).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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


def _overrides(model: str, data: str, out: str) -> list[str]:
    return [
        f"model.name_or_path={model}",
        f"data.path={data}",
        "data.max_length=64",
        "peft.r=4",
        "peft.target_modules=[q_proj,v_proj]",
        "fish.num_samples=16",
        f"output_dir={out}",
    ]


def worker(args) -> None:
    import datasets  # noqa: F401 - imported before the baseline, as a run has it

    from fishds import dist as fdist
    from fishds.config import load_config
    from fishds.model import load_tokenizer
    from fishds.run.data import ShardedBatches
    from fishds.run.preflight import preflight
    from fishds.run.train import load_data

    cfg = load_config(None, _overrides(args.model, args.data, args.out))
    before = {"anon": _status_mib("RssAnon"), "rss": _status_mib("VmRSS")}  # imports done: what follows is data
    t0 = time.perf_counter()
    plan = preflight(cfg, None)
    after_preflight = _status_mib("RssAnon")  # preflight imports deepspeed and builds meta models: not data
    fdist.init_distributed()
    tok = load_tokenizer(plan.model_path)
    examples, _, _ = load_data(cfg, plan, tok)
    load_s = time.perf_counter() - t0
    loaded = {"anon": _status_mib("RssAnon"), "rss": _status_mib("VmRSS")}
    batches = ShardedBatches(examples, 8, fdist.rank(), fdist.world_size(), 0)
    tokens = sum(len(e["input_ids"]) for _ in range(200) for e in batches.next())
    rec = {
        "bench": "data_rss",
        "what": "rank_memory",
        "rank": fdist.rank(),
        "ranks": fdist.world_size(),
        "examples": len(examples),
        "rss_anon_before_mib": round(before["anon"], 1),
        "rss_anon_after_preflight_mib": round(after_preflight, 1),
        "rss_anon_loaded_mib": round(loaded["anon"], 1),
        "rss_anon_after_batches_mib": round(_status_mib("RssAnon"), 1),
        "data_private_mib": round(_status_mib("RssAnon") - before["anon"], 1),
        "vmrss_before_mib": round(before["rss"], 1),
        "vmrss_after_batches_mib": round(_status_mib("VmRSS"), 1),
        "rss_file_mib": round(_status_mib("RssFile"), 1),
        "peak_rss_mib": round(_status_mib("VmHWM"), 1),
        "load_seconds": round(load_s, 2),
        "tokens_drawn": tokens,
    }
    print("RESULT " + json.dumps(rec), flush=True)
    fdist.barrier()


def write_rows(path: Path, rows: int) -> None:
    from toy import WORDS

    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            row = {"instruction": "label the review", "input": words, "output": rng.choice(["fresh", "rotten"])}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="data.num_proc values to time")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model")
    ap.add_argument("--data")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from toy import make_tiny_llama

    from fishds.config import DataSection
    from fishds.model import load_tokenizer
    from fishds.run.data import load_examples

    tmp = Path(tempfile.mkdtemp(prefix="fishds-data-rss-"))
    os.environ["FISHDS_CACHE"] = str(tmp / "cache")  # the token cache and datasets' raw tables, of this run only
    model = make_tiny_llama(tmp / "model")
    data = tmp / "train.jsonl"
    write_rows(data, args.rows)
    command = "bench/data_rss.py " + " ".join(sys.argv[1:])
    timings = {}
    for procs in args.procs:
        shutil.rmtree(tmp / "cache", ignore_errors=True)  # an empty cache: the raw table and the tokens again
        tok = load_tokenizer(str(model))
        t0 = time.perf_counter()
        ex = load_examples(
            tok, str(data), "data.path", DataSection(path=str(data), max_length=64, num_proc=procs), None
        )
        timings[procs] = time.perf_counter() - t0
        _record(
            {
                "bench": "data_rss",
                "what": "tokenise",
                "rows": args.rows,
                "num_proc": procs,
                "seconds": round(timings[procs], 1),
                "rows_per_second": round(args.rows / timings[procs]),
                "examples": len(ex),
                "command": command,
            }
        )
    from bench._session import torchrun

    cmd = torchrun(
        __file__,
        args.ranks,
        ["--worker", "--model", str(model), "--data", str(data), "--out", str(tmp / "out")],
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    recs = sorted(
        (json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )
    for r in recs:
        _record({**r, "rows": args.rows, "command": command})
    hit = "[fishds.data] data.path: cache hit" in out.stdout
    _record(
        {
            "bench": "data_rss",
            "summary": True,
            "rows": args.rows,
            "ranks": args.ranks,
            "tokenise_seconds_by_num_proc": {str(k): round(v, 1) for k, v in timings.items()},
            "data_private_mib_per_rank": [r["data_private_mib"] for r in recs],
            "vmrss_after_batches_mib_per_rank": [r["vmrss_after_batches_mib"] for r in recs],
            "launch_found_the_cache": hit,
            "cpus": len(os.sched_getaffinity(0)),
            "command": command,
        }
    )
    print()
    print(f"{args.rows:,} rows, {len(os.sched_getaffinity(0))} CPUs (shared machine: timings are noisy)")
    print("tokenise into an empty cache:  " + "   ".join(f"num_proc {k}: {v:7.1f} s" for k, v in timings.items()))
    print(f"{'':30}" + "   ".join(f"{'rank ' + str(r['rank']):>17}" for r in recs))
    for label, field in (
        ("private (RssAnon) before, MiB", "rss_anon_before_mib"),
        ("private after preflight, MiB", "rss_anon_after_preflight_mib"),
        ("private after data, MiB", "rss_anon_after_batches_mib"),
        ("private: preflight + data, MiB", "data_private_mib"),
        ("VmRSS after data, MiB", "vmrss_after_batches_mib"),
        ("load seconds (cache hit)", "load_seconds"),
    ):
        print(f"{label:30}" + "   ".join(f"{r[field]:17}" for r in recs))
    shutil.rmtree(tmp, ignore_errors=True)


def _record(rec: dict) -> None:
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    with (results / "data_rss.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

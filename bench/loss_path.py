"""Memory and time of the loss path (train.loss_impl): full vs chunked cross-entropy at a 128,256-token vocabulary.

    .venv/bin/python bench/loss_path.py [--ranks 2] [--tokens 256 1024 2048] [--impls full chunked] [--precision fp32]

A 2-layer Llama (hidden 256, Llama-3's 128,256-token vocabulary, random weights, a word-level tokenizer over that
vocabulary) trains LoRA r=8 on q/v with one packed block of --tokens tokens per micro-batch (data.format=text, every
token a target), --ranks ranks (torchrun; gloo on CPU), ZeRO-2 (ds_configs/zero2.json), fish.selection=random (no
Fisher pass). Each (tokens, impl) is its own launch: 1 warm-up step, then --steps timed steps; per rank the peak
resident memory of a training step (VmHWM, reset through /proc/self/clear_refs before the steps) and, on CUDA, the
peak allocated GPU memory; the maximum over ranks. One JSON line per case, then a summary line with the ratios
(chunked at the largest size against the smallest size's peak; chunked against full step time), all appended to
bench/results/loss_path.jsonl (bench/_session.record). Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

VOCAB = 128256


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_model(folder: Path, vocab: int = VOCAB) -> Path:
    """A 2-layer Llama with `vocab` tokens and a word-level tokenizer w0 .. w{vocab-5} (+ 4 specials)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    words.update({f"w{i}": i + 4 for i in range(vocab - 4)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def write_text(path: Path, rows: int, words: int, vocab: int = VOCAB) -> Path:
    rng = random.Random(0)
    path.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{rng.randrange(vocab - 4)}" for _ in range(words))}) + "\n"
            for _ in range(rows)
        )
    )
    return path


def worker(args) -> None:
    import torch

    from fishds import dist as fdist
    from fishds.config import load_config
    from fishds.run.train import setup, train_step

    cfg = load_config(None, args.overrides)
    s = setup(cfg, str(ROOT / "ds_configs" / "zero2.json"))
    cuda = torch.cuda.is_available()
    train_step(s.engine, s.batches, s.collate, 1)  # warm-up (allocations, DeepSpeed buffers)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of the steps below
        reset = True
    except OSError:
        reset = False
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for _ in range(args.steps):
        fdist.barrier()
        t0 = time.perf_counter()
        st = train_step(s.engine, s.batches, s.collate, 1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens = st["tokens"]
    peaks = torch.tensor(
        [_hwm_mib(), torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0, max(times)], dtype=torch.float64
    )
    fdist.all_reduce_(peaks, op=torch.distributed.ReduceOp.MAX)
    if fdist.is_main():
        print(
            "RESULT "
            + json.dumps(
                {
                    "peak_rss_mib": round(float(peaks[0]), 1),
                    "peak_rss_is_step_peak": reset,
                    "peak_gpu_mib": round(float(peaks[1]), 1) if cuda else None,
                    "step_s_median": round(statistics.median(times), 4),
                    "step_s_all": [round(t, 4) for t in times],
                    "tokens_per_rank": tokens,
                }
            ),
            flush=True,
        )
    fdist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--impls", nargs="+", default=["full", "chunked"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--vocab", type=int, default=VOCAB)
    ap.add_argument("--note", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        from fishds.dist import prefer_cpu_accelerator_if_no_cuda

        prefer_cpu_accelerator_if_no_cuda()
        return worker(args)

    from _session import record

    work = Path(tempfile.mkdtemp(prefix="fishds-loss-path-"))
    model = make_model(work / "model", args.vocab)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    for n in args.tokens:
        rows = 64 * args.ranks * (args.steps + 2) if n <= 2048 else 4 * args.ranks * (args.steps + 2) + 8  # 2 a block
        data = write_text(work / f"train-{n}.jsonl", rows, n // 2 - 2, args.vocab)
        for impl in args.impls:
            ov = [
                f"model.name_or_path={model}",
                f"data.path={data}",
                "data.format=text",
                f"data.max_length={n}",
                "data.packing=true",
                "data.max_eval_examples=1",
                "peft.target_modules=[q_proj,v_proj]",
                "fish.selection=random",
                "fish.keep_ratio=0.5",
                "train.micro_batch_size=1",
                f"train.max_steps={args.steps + 1}",
                f"train.precision={args.precision}",
                f"train.loss_impl={impl}",
                "train.report_to=[]",
                "save_initial_adapter=false",
                f"output_dir={work / f'out-{n}-{impl}'}",
            ]
            cmd = [sys.executable, __file__, "--worker", "--steps", str(args.steps), *ov]
            if args.ranks > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]
                cmd += [__file__, "--worker", "--steps", str(args.steps), *ov]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(
                    f"{impl} at {n} tokens failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                )
            rec = {
                "bench": "loss_path",
                "impl": impl,
                "tokens_per_micro_batch": n,
                "ranks": args.ranks,
                "zero": 2,
                "vocab": args.vocab,
                "precision": args.precision,
                **json.loads(line[len("RESULT ") :]),
                "launch_s": round(time.perf_counter() - t0, 1),
                "note": args.note,
            }
            record("loss_path", rec)
            rows.append(rec)
    by = {(r["impl"], r["tokens_per_micro_batch"]): r for r in rows}
    lo, hi = min(args.tokens), max(args.tokens)
    key = "peak_gpu_mib" if rows[0]["peak_gpu_mib"] else "peak_rss_mib"
    print(f"\n{'tokens':>8} " + " ".join(f"{impl + ' ' + key:>24} {impl + ' step s':>16}" for impl in args.impls))
    for n in args.tokens:
        print(
            f"{n:>8} " + " ".join(f"{by[(i, n)][key]:>24.1f} {by[(i, n)]['step_s_median']:>16.3f}" for i in args.impls)
        )
    summary = {"bench": "loss_path", "summary": True, "measure": key, "note": args.note}
    for impl in args.impls:
        summary[f"{impl}_peak_{hi}_over_{lo}"] = round(by[(impl, hi)][key] / by[(impl, lo)][key], 3)
    if {"full", "chunked"} <= set(args.impls):
        for n in args.tokens:
            summary[f"chunked_over_full_step_time_{n}"] = round(
                by[("chunked", n)]["step_s_median"] / by[("full", n)]["step_s_median"], 3
            )
            summary[f"chunked_over_full_peak_{n}"] = round(by[("chunked", n)][key] / by[("full", n)][key], 3)
    print()
    record("loss_path", summary)


if __name__ == "__main__":
    main()

"""Peak memory and step time: QLoRA+FISH vs LoRA+FISH vs plain QLoRA, one after the other, same data and steps.

    python bench/qlora_memory.py [--ranks 2] [--ds_config ds_configs/zero3.json] [--steps 6]

Each arm is a real fishds run (torchrun, gloo on CPU): SmolLM2-135M-Instruct (model.name_or_path=
smollm2-135m-instruct, prepared offline) on Rotten Tomatoes, LoRA r=8 on q/k/v/o, fp32. Reported per arm:
the largest peak RSS of any rank (whole process: Python, torch, the model as loaded), the per-rank bytes
fishds measured on the engine after training (fish_report.json memory_per_rank: frozen backbone, adapter,
optimizer, masks), and the median optimizer-step time of the masked training steps (metrics.jsonl).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fishds.files import METRICS_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]
COMMON = {
    "model.name_or_path": "smollm2-135m-instruct",
    "data.path": "rotten_tomatoes",
    "data.max_length": 64,
    "data.max_examples": 400,
    "data.max_eval_examples": 8,
    "peft.r": 8,
    "peft.alpha": 16,
    "peft.target_modules": "[q_proj,k_proj,v_proj,o_proj]",
    "fish.num_samples": 8,
    "fish.granularity": "batch",
    "fish.keep_ratio": 0.25,
    "train.micro_batch_size": 4,
    "train.lr": 1e-3,
    "train.log_every": 100,
}
ARMS = [
    ("QLoRA+FISH (NF4)", {"quant.bits": 4}),
    ("LoRA+FISH (fp32 backbone)", {}),
    ("plain QLoRA (NF4, dense)", {"quant.bits": 4, "fish.selection": "dense", "fish.keep_ratio": "null"}),
]


def run_arm(extra: dict, out: Path, ranks: int, ds_config: str, steps: int) -> dict:
    o = dict(COMMON, **extra, **{"train.max_steps": steps, "output_dir": str(out)})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(ROOT / "launch" / "train.py"),
        "--ds_config",
        ds_config,
    ] + [f"{k}={v}" for k, v in o.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    mem = json.loads((out / REPORT_FILE).read_text())["memory_per_rank"]
    steps_s = [
        json.loads(line)["seconds"]
        for line in (out / METRICS_FILE).read_text().splitlines()
        if '"phase": "train"' in line
    ]
    line = next((ln for ln in proc.stdout.splitlines() if "memory per rank" in ln), "")
    return {
        "peak_rss": max(m["peak_rss"] for m in mem),
        "frozen": max(m["frozen"] for m in mem),
        "model_states": max(m["model_states"] for m in mem),
        "masks": max(m["masks"] for m in mem),
        "step_s": statistics.median(steps_s[1:] or steps_s),
        "wall_s": time.time() - t0,
        "line": line,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero3.json"))
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    mib = 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(ARMS):
            r = run_arm(extra, Path(tmp) / str(i), args.ranks, args.ds_config, args.steps)
            print(f"{name}: {r['line']}", flush=True)
            rows.append((name, r))
    print(
        f"\n{args.ranks} rank(s), {Path(args.ds_config).name}, SmolLM2-135M-Instruct, LoRA r=8 q/k/v/o, fp32, "
        f"micro-batch 4 x <=64 tokens, {args.steps} steps (median step time of steps 2..)"
    )
    print(
        "| arm | peak RSS per rank (MiB) | frozen backbone per rank (MiB) | model states per rank (MiB) | "
        "masks (MiB) | step (s) | run wall (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['peak_rss'] / mib:,.0f} | {r['frozen'] / mib:,.1f} | {r['model_states'] / mib:,.1f} | "
            f"{r['masks'] / mib:,.2f} | {r['step_s']:.3f} | {r['wall_s']:.0f} |"
        )


if __name__ == "__main__":
    main()

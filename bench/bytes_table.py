"""Bytes per rank for masks, optimizer state and gradients, dense masked AdamW vs the compact optimizer state
(fish.compact_optimizer), from fishds.plan at 7B / 13B / 70B, next to the measurement on SmolLM2-135M.

    python bench/bytes_table.py [--world 8] [--zero 3] [--r 16] [--keep_ratio 0.01]

Prints a markdown table (the README's). The measured row reads bench/results/optimizer_state.jsonl
(written by bench/optimizer_state.py on 2 CPU ranks).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishds.plan import PRESETS, Setup, plan  # noqa: E402


def mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--keep_ratio", type=float, default=0.01)
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = ap.parse_args(argv)
    print(
        f"Per rank, MB: LoRA r={args.r} on all linear projections, keep {args.keep_ratio:g}, ZeRO-{args.zero}, "
        f"{args.world} ranks, {args.precision} (plan)\n"
    )
    print(
        "| model | pool entries | masks, 1 bit per entry (both) | optimizer, fp32 masters + AdamW state: dense | "
        "compact | enforcer copies: dense | compact | gradients (both) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("llama-7b", "llama-13b", "llama-70b"):
        s = dict(zero=args.zero, world=args.world, precision=args.precision, r=args.r, keep_ratio=args.keep_ratio)
        dense, compact = plan(PRESETS[name], Setup(**s)), plan(PRESETS[name], Setup(**s, compact=True))
        n = dense["adapter_entries"]
        print(
            f"| {name} | {n:,.0f} | {mb(compact['masks'])} | {mb(dense['optimizer'])} | {mb(compact['optimizer'])} | "
            f"{mb(dense['mask_restore'])} | 0 | {mb(dense['gradients'])} |"
        )
    res = ROOT / "bench/results/optimizer_state.jsonl"
    if res.is_file():
        rows = [json.loads(line) for line in res.read_text().splitlines() if line.strip()]
        latest = {(r["zero_stage"], r["arm"]): r for r in rows}  # the last round of each
        print(
            "\nMeasured on SmolLM2-135M-Instruct (bench/optimizer_state.py: 2 CPU ranks, fp32, LoRA r=16 all-linear, "
            "keep 0.01), rank 0, bytes, against the plan of the same set-up:\n"
        )
        print(
            "| ZeRO | pool | k | Adam state dense: measured / plan | compact: measured / plan | "
            "enforcer copies dense: measured / plan | compact |"
        )
        print("|---|---|---|---|---|---|---|")
        for z in sorted({k[0] for k in latest}):
            d, c = latest.get((z, "dense")), latest.get((z, "compact"))
            if not (d and c):
                continue
            s = dict(zero=z, world=d["world_size"], precision="fp32", r=16, keep_ratio=d["k"] / d["pool"])
            pd, pc = plan(PRESETS["smollm2-135m"], Setup(**s)), plan(PRESETS["smollm2-135m"], Setup(**s, compact=True))
            masters = 4 * pd["adapter_entries"] / d["world_size"]
            print(
                f"| {z} | {d['pool']:,} | {d['k']:,} | {d['per_rank'][0]['optimizer_state']:,} / "
                f"{pd['optimizer'] - masters:,.0f} | {c['per_rank'][0]['optimizer_state']:,} / "
                f"{pc['optimizer'] - masters:,.0f} | {d['per_rank'][0]['mask_restore_copies']:,} / "
                f"{pd['mask_restore']:,.0f} | {c['per_rank'][0]['mask_restore_copies']:,} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

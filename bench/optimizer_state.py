"""Optimizer-state bytes per rank and step time: dense masked AdamW against fish.compact_optimizer.

    for arm in dense compact; do
      OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/optimizer_state.py --arm $arm \
          --ds_config ds_configs/zero2.json
    done
    python bench/optimizer_state.py --table        # the table of every recorded pair, with ratios

One arm per launch (the client optimizer is chosen when the engine is built). Defaults: SmolLM2-135M
with LoRA r=16 on all linear layers, keep ratio 1%, a random mask (no Fisher pass: the mask's origin
does not change the memory), fp32. After `--warm` untimed steps, `--steps` steps are timed (median of
the whole train step, and of the torch optimizer step inside DeepSpeed alone). The bytes are those of
fishds.memory.measure: the torch optimizer state (moments, steps, compact indices), the mask
enforcer's copies of frozen fp32 master entries (dense arm only), and the fp32 tensors the optimizer
updates (masters; the same in both arms). Appends one JSON line per arm to
bench/results/optimizer_state.jsonl.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._session

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_state.jsonl"


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    by = {}
    for r in rows:  # latest record of each (setting, arm)
        by[(r["model"], r["zero_stage"], r["world_size"], r["pool"], r["k"], r["arm"])] = r
    print(
        "| model | ZeRO | ranks | pool | k | arm | optimizer state / rank (B) | + mask restore copies / rank (B) "
        "| fp32 masters / rank (B) | train step (s) | optimizer step (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(by):
        r = by[key]
        d = by.get(key[:-1] + ("dense",))
        st = max(x["optimizer_state"] for x in r["per_rank"])
        mr = max(x["mask_restore_copies"] for x in r["per_rank"])
        ma = max(x.get("optimizer_masters", x.get("fp32_masters", 0)) for x in r["per_rank"])
        ratio = ""
        if d is not None and r["arm"] == "compact":
            dst = max(x["optimizer_state"] for x in d["per_rank"])
            dmr = max(x["mask_restore_copies"] for x in d["per_rank"])
            ratio = (
                f" ({st / dst:.4f} x dense; state+copies {(st + mr) / (dst + dmr):.4f} x; "
                f"step {r['train_step_s'] / d['train_step_s']:.3f} x, opt step "
                f"{r['optimizer_step_s'] / d['optimizer_step_s']:.3f} x)"
            )
        print(
            f"| {r['model']} | {r['zero_stage']} | {r['world_size']} | {r['pool']:,} | {r['k']:,} | {r['arm']} | "
            f"{st:,}{ratio} | {mr:,} | {ma:,} | {r['train_step_s']:.3f} | {r['optimizer_step_s']:.4f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", choices=["dense", "compact"])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--ds_config", default="ds_configs/zero2.json")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--local_rank", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.table:
        return table()
    from fishds.dist import prefer_cpu_accelerator_if_no_cuda

    prefer_cpu_accelerator_if_no_cuda()
    import torch  # noqa: F401

    from bench._session import record, session
    from fishds import dist as fdist
    from fishds import memory
    from fishds.fish.compact import apply_mask
    from fishds.fish.enforce import MaskEnforcer
    from fishds.fish.selection import scoring_examples, select_masks
    from fishds.run.train import train_step

    defaults = [
        "peft.r=16",
        "peft.alpha=32",
        "peft.target_modules=all-linear",
        "fish.selection=random",
        "fish.keep_ratio=0.01",
        "train.micro_batch_size=2",
        "data.max_length=64",
        "train.weight_decay=0.01",
        "data.max_examples=256",
        "data.eval_path=null",
    ]
    compact = args.arm == "compact"
    cfg, s = session(args, "fishds-bench-", defaults + [f"fish.compact_optimizer={str(compact).lower()}"])
    masks, _ = select_masks(
        cfg.fish, s.engine, s.pool, s.k, scoring_examples(cfg.fish, s.examples), s.collate, cfg.train.micro_batch_size
    )
    masks = {t.name: masks.get(t.name, torch.ones(t.shape, dtype=torch.bool)) for t in s.trainable.tensors}
    enforcer = MaskEnforcer(s.engine, s.trainable, masks, restore=not compact)
    if compact:
        apply_mask(s.engine, s.trainable, masks)
    opt = s.engine.basic_optimizer
    inner, opt_times = opt.step, []

    def timed(*a, **kw):
        t0 = time.perf_counter()
        r = inner(*a, **kw)
        opt_times.append(time.perf_counter() - t0)
        return r

    opt.step = timed
    steps = []
    for _ in range(args.warm + args.steps):
        fdist.barrier()
        t0 = time.perf_counter()
        train_step(s.engine, s.batches, s.collate, cfg.train.grad_accum)
        steps.append(time.perf_counter() - t0)
    per_rank = memory.gather(memory.measure(s.engine, masks, enforcer))
    if fdist.is_main():
        n = args.warm
        rec = {
            "model": s.plan.model_path.rstrip("/").split("/")[-1],
            "ds_config": args.ds_config,
            "arm": args.arm,
            "zero_stage": s.engine.zero_optimization_stage(),
            "world_size": fdist.world_size(),
            "precision": cfg.train.precision,
            "pool": s.pool.size,
            "k": s.k,
            "train_step_s": round(statistics.median(steps[n:]), 4),
            "optimizer_step_s": round(statistics.median(opt_times[-args.steps :]), 5),
            "per_rank": per_rank,
        }
        record("optimizer_state", rec)
    fdist.barrier()


if __name__ == "__main__":
    main()

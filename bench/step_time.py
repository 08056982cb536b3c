"""FISH-LoRA against plain LoRA in one run: step time, Fisher cost, selection cost, mask size.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/step_time.py \
        --ds_config ds_configs/zero3.json [--config configs/demo.yaml] [key=value ...]

One engine, one model, one DeepSpeed config. Training steps alternate in blocks between plain LoRA
(no hooks, no wrapper) and FISH-LoRA (mask hooks + optimizer wrapper installed), so drift in machine
speed hits both arms alike; the median step time of each arm is reported with their ratio. Then the
Fisher pass is timed per example (granularity sample) and per micro-batch (granularity batch) in units
of a training step, the distributed top-k is timed with the bytes it sends, and the mask file is
written to measure bits per pool entry. Prints one JSON object (rank 0) and appends it to
bench/results/step_time.jsonl.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._comm, bench._session

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()


from bench._comm import CommCounter  # noqa: E402
from bench._session import record, session  # noqa: E402
from fishds import dist as fdist  # noqa: E402
from fishds.fish.enforce import MaskEnforcer  # noqa: E402
from fishds.fish.fisher import collect_scores  # noqa: E402
from fishds.fish.mask import save_masks, share_selection  # noqa: E402
from fishds.fish.select import exact_topk, float_keys  # noqa: E402
from fishds.fish.selection import scoring_examples  # noqa: E402
from fishds.run.train import train_step  # noqa: E402


def timed_steps(s, n: int) -> list[float]:
    out = []
    for _ in range(n):
        fdist.barrier()
        t0 = time.perf_counter()
        train_step(s.engine, s.batches, s.collate, s.cfg.train.grad_accum)
        out.append(time.perf_counter() - t0)
    return out


def alternating_steps(s, masks, rounds: int, block: int) -> tuple[list[float], list[float]]:
    """Step times of plain LoRA and FISH-LoRA (mask hooks + optimizer wrapper installed), `rounds` alternating blocks
    of `block` steps each on the same engine, so drift in machine speed hits both arms alike."""
    plain, fish = [], []
    for _ in range(rounds):
        plain += timed_steps(s, block)
        enforcer = MaskEnforcer(s.engine, s.pool, masks)
        fish += timed_steps(s, block)
        enforcer.remove()
    return plain, fish


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--ds_config", default="ds_configs/zero3.json")
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks per arm")
    ap.add_argument("--block", type=int, default=5, help="steps per block")
    ap.add_argument("--local_rank", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg, s = session(args, "fishds-bench-")
    samples = scoring_examples(cfg.fish, s.examples)
    mbs = cfg.train.micro_batch_size

    timed_steps(s, 2)  # warm-up: allocator, ZeRO-3 trace
    scores, per_sample = collect_scores(s.engine, s.pool, samples, "sample", mbs, s.collate)
    _, per_batch = collect_scores(s.engine, s.pool, samples, "batch", mbs, s.collate)
    fdist.barrier()
    with CommCounter() as comm:
        t0 = time.perf_counter()
        local_sel, _ = exact_topk(float_keys(scores), s.k)
        select_s = time.perf_counter() - t0
        topk_bytes = comm.bytes
        masks = share_selection(s.pool, local_sel)
        share_bytes = comm.bytes - topk_bytes

    plain, fish = alternating_steps(s, masks, args.rounds, args.block)

    if fdist.is_main():
        with tempfile.TemporaryDirectory() as d:
            save_masks(Path(d) / "m.safetensors", masks)
            from safetensors import safe_open

            with safe_open(str(Path(d) / "m.safetensors"), "pt") as f:
                mask_bytes = sum(f.get_tensor(k).numel() for k in f.keys())
        step = statistics.median(plain)
        n_ex = len(samples)
        n_mb = per_batch["passes_per_rank"]
        rec = {
            "model": s.plan.model_path.rstrip("/").split("/")[-1],
            "ds_config": args.ds_config,
            "zero_stage": s.engine.zero_optimization_stage(),
            "world_size": fdist.world_size(),
            "precision": cfg.train.precision,
            "micro_batch_size": mbs,
            "pool": s.pool.size,
            "k": s.k,
            "plain_lora_step_s": round(step, 4),
            "fish_lora_step_s": round(statistics.median(fish), 4),
            "step_time_ratio": round(statistics.median(fish) / step, 4),
            # per example (granularity sample, fish.per_example default: batched), in training steps
            "fisher_per_sample_steps": round(
                per_sample["local_pass_seconds"] / -(-n_ex // fdist.world_size()) / step, 3
            ),
            "fisher_per_example": per_sample["per_example"],
            "fisher_per_microbatch_steps": round(per_batch["local_pass_seconds"] / n_mb / step, 3),
            "fisher_samples": n_ex,
            "fisher_sample_pass_s": round(per_sample["collect_seconds"], 2),
            "select_s": round(select_s, 4),
            "select_bytes_per_rank": topk_bytes,
            "mask_share_bytes_per_rank": share_bytes,
            "mask_bits_per_entry_on_disk": round(8 * mask_bytes / s.pool.size, 4),
            "mask_bits_per_entry_in_memory": round(8 * masks.nbytes / s.pool.size, 4),  # PackedMasks while training
        }
        record("step_time", rec)
    fdist.barrier()


if __name__ == "__main__":
    main()

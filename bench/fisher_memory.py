"""Fisher collection memory per rank: accumulator and gradient peaks, scores held after the reduction, peak RSS.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 bench/fisher_memory.py \\
        --ds_config ds_configs/zero3.json [--config configs/demo.yaml] [key=value ...]

Sets up the run as fishds does (model, LoRA, DeepSpeed engine), then runs fishds.fish.fisher.collect_scores once
on the fish.num_samples scoring examples. Rank 0 prints one JSON object:
  pool, world, zero_stage, ceil_pool_over_world        the pool and the ideal share per rank
  accumulator_peak_bytes, grad_peak_bytes              from collect_scores' statistics (max over ranks):
                                                       fp32 accumulator (pool x 4) and one pass's gradients
  scores_held_bytes, scores_held_entries               what a rank keeps after the reduction (max over ranks)
  rss_before_mb, rss_peak_mb, rss_after_mb (per rank)  process RSS before the pass, its peak during the pass
                                                       (VmHWM, reset just before), and after it
  rss_after_trim_mb (per rank)                         RSS after glibc malloc_trim(0): without the heap pages
                                                       the allocator keeps cached after the pass
  reduce_bytes_per_rank                                bytes each rank passed to dist.reduce (bench/_comm.py)
  cuda_peak_mb (per rank, CUDA only)                   torch.cuda.max_memory_allocated during the pass
"""

import argparse
import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._comm, bench._session

from fishds.dist import prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench._comm import CommCounter  # noqa: E402
from bench._session import session  # noqa: E402
from fishds import dist as fdist  # noqa: E402
from fishds.fish.fisher import collect_scores  # noqa: E402
from fishds.fish.selection import scoring_examples  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--ds_config", default="ds_configs/zero3.json")
    ap.add_argument("--local_rank", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg, s = session(args, "fishds-fmem-")
    samples = scoring_examples(cfg.fish, s.examples)
    cuda = torch.cuda.is_available()
    gc.collect()
    fdist.barrier()
    rss_before = _status_kb("VmRSS")
    peak_ok = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with CommCounter() as comm:
        scores, stats = collect_scores(
            s.engine, s.pool, samples, cfg.fish.granularity, cfg.train.micro_batch_size, s.collate
        )
    rss_peak = _status_kb("VmHWM") if peak_ok else -1
    gc.collect()
    rss_after = _status_kb("VmRSS")
    _malloc_trim()
    rss_trim = _status_kb("VmRSS")
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else -1.0
    mine = torch.tensor(
        [
            rss_before / 1024,
            rss_peak / 1024,
            rss_after / 1024,
            comm.by_op.get("reduce", 0),
            scores.numel(),
            cuda_peak,
            rss_trim / 1024,
        ],
        dtype=torch.float64,
    )
    rows = [torch.zeros_like(mine) for _ in range(fdist.world_size())]
    if fdist.world_size() > 1:
        dist.all_gather(rows, mine)
    else:
        rows = [mine]
    if fdist.is_main():
        world, pool = fdist.world_size(), s.pool.size
        col = lambda i, nd=1: [round(float(r[i]), nd) for r in rows]  # noqa: E731
        rec = {
            "model": s.plan.model_path.rstrip("/").split("/")[-1],
            "zero_stage": s.engine.zero_optimization_stage(),
            "world": world,
            "precision": cfg.train.precision,
            "granularity": cfg.fish.granularity,
            "num_samples": len(samples),
            "pool": pool,
            "ceil_pool_over_world": -(-pool // world),
            "pool_fp32_bytes": pool * 4,
            **{
                k: stats.get(k)
                for k in (
                    "accumulator_peak_bytes",
                    "grad_peak_bytes",
                    "scores_held_bytes",
                    "scores_held_entries",
                    "passes_per_rank",
                )
            },
            "collect_seconds": round(stats["collect_seconds"], 2),
            "scores_entries_per_rank": [int(r[4]) for r in rows],
            "rss_before_mb": col(0),
            "rss_peak_mb": col(1),
            "rss_after_mb": col(2),
            "rss_after_trim_mb": col(6),
            "rss_peak_minus_before_mb": [round(float(r[1] - r[0]), 1) for r in rows],
            "reduce_bytes_per_rank": [int(r[3]) for r in rows],
        }
        if cuda:
            rec["cuda_peak_mb"] = col(5)
        print(json.dumps(rec), flush=True)
    fdist.barrier()


if __name__ == "__main__":
    main()

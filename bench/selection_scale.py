"""Distributed exact top-k (fishds.fish.select.exact_topk) at scale, against gathering every score to rank 0.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/selection_scale.py [--sizes 4e6,40e6,160e6] [--keep_ratio 0.01] [--repeat 1]

Every rank generates only its own chunk (pool.Pool.chunk) of a synthetic score vector with many ties:
25% exactly 0.0 (LoRA A at init), 10% 0.125, 10% 0.5, 2% 0.995, 0.25% 1.0, the rest uniform in [0, 1).
About 0.5% of the entries are above 0.995, so for keep_ratio 0.01 the k-th value is 0.995 and the
boundary falls inside that tie group (reported as n_above < k < n_above + n_tied). Values come from a
torch.Generator seeded per block of 2^20 global indices, so the data depends on neither world size nor
pool size. For each pool size rank 0 prints one JSON line:
  bytes_per_rank, seconds   bytes this rank passed to collectives inside exact_topk (max over ranks) and
                            its wall time (max over ranks; float_keys is timed apart as keys_seconds)
  local_topk_seconds        one torch.topk(min(k, shard)) over the rank's own float32 shard (max over
                            ranks); the target is ratio_to_local_topk = seconds / it <= 2
  ratio_with_keys_to_local_topk  (keys_seconds + seconds) / local_topk_seconds: scores to selection
  gather_bytes, gather_seconds  the naive way: dist.gather of every float32 chunk to rank 0 (bytes sent
                            per rank, max) and a top-k there with ties broken by the lowest index
  same_selection            both ways select the same k entries (exact_topk's mask via share_selection)
  mask_share_bytes, mask_share_seconds  share_selection's all-gather of packed bits (pool / 8 bytes)
Collective bytes are counted by bench/_comm.py (shared with bench/step_time.py).
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench._comm, bench._session

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench._comm import CommCounter  # noqa: E402
from fishds import dist as fdist  # noqa: E402
from fishds.fish.mask import share_selection  # noqa: E402
from fishds.fish.pool import Pool  # noqa: E402
from fishds.fish.select import exact_topk, float_keys, key_to_float  # noqa: E402

BLOCK = 1 << 20


def scores_for(start: int, end: int, seed: int) -> torch.Tensor:
    """Synthetic scores of global indices [start, end), generated block by block of the global index space."""
    out = torch.empty(end - start)
    for b in range(start // BLOCK, -(-end // BLOCK)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        u, v = torch.rand(BLOCK, generator=g), torch.rand(BLOCK, generator=g)
        for hi, val in ((0.4725, 1.0), (0.47, 0.995), (0.45, 0.5), (0.35, 0.125), (0.25, 0.0)):
            v = torch.where(u < hi, val, v)  # the last (lowest) threshold wins
        lo, up = max(start, b * BLOCK), min(end, (b + 1) * BLOCK)
        out[lo - start : up - start] = v[lo - b * BLOCK : up - b * BLOCK]
    return out


def timed(fn, repeat: int = 1):
    """(last result, best wall seconds, bytes sent in the last call, its collective calls); max over ranks."""
    sec = float("inf")
    for _ in range(repeat):
        dist.barrier()
        with CommCounter() as c:
            t0 = time.perf_counter()
            out = fn()
            sec = min(sec, time.perf_counter() - t0)
    t = torch.tensor([sec, c.bytes], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return out, float(t[0]), int(t[1]), c.calls


def topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Boolean mask of the k largest scores, ties at the k-th value broken by the lowest index."""
    t = torch.topk(scores, k, sorted=False).values.min()
    sel = scores > t
    sel[(scores == t).nonzero()[: k - int(sel.sum()), 0]] = True
    return sel, float(t)


def naive_gather(scores: torch.Tensor, pool: Pool, k: int):
    """Gather every float32 chunk to rank 0 (padded to the largest chunk) and select there."""
    world = fdist.world_size()
    chunks = [pool.chunk(r, world) for r in range(world)]
    buf = torch.zeros(chunks[0][1] - chunks[0][0])
    buf[: scores.numel()] = scores
    parts = [torch.empty_like(buf) for _ in range(world)] if fdist.rank() == 0 else None
    dist.gather(buf, parts, dst=0)
    if fdist.rank() != 0:
        return None
    full = torch.cat([p[: e - s] for p, (s, e) in zip(parts, chunks)])
    return topk_lowest_index(full, k), full


def run_size(n: int, args) -> dict | None:
    pool = Pool([("scores", torch.nn.Parameter(torch.empty(n, device="meta"), requires_grad=False))])
    world, rank = fdist.world_size(), fdist.rank()
    k = pool.num_selected(args.keep_ratio, None)
    start, end = pool.chunk(rank, world)
    scores = scores_for(start, end, args.seed)
    keys, keys_s, _, _ = timed(lambda: float_keys(scores), args.repeat)
    (sel, thr), sec, nbytes, calls = timed(lambda: exact_topk(keys, k), args.repeat)  # noqa: F821 (del below)
    del keys
    _, local_s, _, _ = timed(lambda: torch.topk(scores, min(k, scores.numel())), args.repeat)
    masks, share_s, share_bytes, _ = timed(lambda: share_selection(pool, sel))
    gathered, gather_s, gather_bytes, _ = timed(lambda: naive_gather(scores, pool, k))
    row = {
        "pool": n,
        "k": k,
        "world": world,
        "bytes_per_rank": nbytes,
        "seconds": round(sec, 4),
        "local_topk_seconds": round(local_s, 4),
        "ratio_to_local_topk": round(sec / local_s, 3),
        "ratio_with_keys_to_local_topk": round((keys_s + sec) / local_s, 3),
        "gather_bytes": gather_bytes,
        "gather_seconds": round(gather_s, 4),
        "same_selection": None,
        "mask_share_bytes": share_bytes,
        "mask_share_seconds": round(share_s, 4),
        "keys_seconds": round(keys_s, 4),
        "collectives": calls,
    }
    if rank != 0:
        return None
    (naive, t), full = gathered
    row["same_selection"] = torch.equal(masks["scores"], naive) and key_to_float(thr) == t
    row.update(threshold=t, n_above=int((full > t).sum()), n_tied=int((full == t).sum()))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4e6,40e6,160e6", help="comma-separated pool sizes (floats allowed)")
    ap.add_argument("--keep_ratio", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for the timed top-k calls")
    args = ap.parse_args()
    fdist.init_distributed()
    torch.set_num_threads(1)
    for n in (int(float(s)) for s in args.sizes.split(",")):
        row = run_size(n, args)
        if row is not None:
            print(json.dumps(row), flush=True)
        gc.collect()
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

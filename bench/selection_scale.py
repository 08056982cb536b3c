"""Distributed exact top-k (fishds.select.exact_topk) at scale, against gathering every score to rank 0.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 \
        bench/selection_scale.py [--sizes 4e6,40e6,160e6] [--keep_ratio 0.01] [--repeat 1] [--prototype]

Every rank generates only its own chunk (pool.Pool.chunk) of a synthetic score vector with many ties:
25% exactly 0.0 (LoRA A at init), 10% 0.125, 10% 0.5, 2% 0.995, 0.25% 1.0, the rest uniform in [0, 1).
About 0.5% of the entries are above 0.995, so for keep_ratio 0.01 the k-th value is 0.995 and the
boundary falls inside that tie group (reported as n_above < k < n_above + n_tied). Values come from a
torch.Generator seeded per block of 2^20 global indices, so the data depends on neither world size nor
pool size. For each pool size rank 0 prints one JSON line:
  bytes_per_rank, seconds   bytes this rank passed to collectives inside exact_topk (max over ranks) and
                            its wall time (max over ranks; float_keys is timed apart as keys_seconds)
  local_topk_seconds        one torch.topk(min(k, shard)) over the rank's own float32 shard (max over
                            ranks); the issue's target is ratio_to_local_topk = seconds / it <= 2
  gather_bytes, gather_seconds  the naive way: dist.gather of every float32 chunk to rank 0 (bytes sent
                            per rank, max) and a top-k there with ties broken by the lowest index
  same_selection            both ways select the same k entries (exact_topk's mask via share_selection)
  mask_share_bytes, mask_share_seconds  share_selection's all-gather of packed bits (pool / 8 bytes)
With --prototype, also proto_*: radix_topk on float_keys32, a radix-select variant prototyped below.
"""
import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fishds import dist as fdist  # noqa: E402
from fishds.mask import share_selection  # noqa: E402
from fishds.pool import Pool  # noqa: E402
from fishds.select import exact_topk, float_keys, key_to_float  # noqa: E402

BLOCK = 1 << 20
SENT_ARG = {"all_reduce": 0, "all_gather": 1, "all_gather_into_tensor": 1, "gather": 0, "broadcast": 0}


class CommCounter:
    """Counts calls and bytes this rank passes to torch.distributed collectives while active."""

    def __enter__(self):
        self.bytes, self.calls, self._orig = 0, 0, {}
        for name, arg in SENT_ARG.items():
            orig = self._orig[name] = getattr(dist, name)

            def wrapped(*args, _orig=orig, _arg=arg, **kwargs):
                self.bytes += args[_arg].numel() * args[_arg].element_size()
                self.calls += 1
                return _orig(*args, **kwargs)
            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


def scores_for(start: int, end: int, seed: int) -> torch.Tensor:
    """Synthetic scores of global indices [start, end), generated block by block of the global index space."""
    out = torch.empty(end - start)
    for b in range(start // BLOCK, -(-end // BLOCK)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        u, v = torch.rand(BLOCK, generator=g), torch.rand(BLOCK, generator=g)
        for hi, val in ((0.4725, 1.0), (0.47, 0.995), (0.45, 0.5), (0.35, 0.125), (0.25, 0.0)):
            v = torch.where(u < hi, val, v)  # the last (lowest) threshold wins
        lo, up = max(start, b * BLOCK), min(end, (b + 1) * BLOCK)
        out[lo - start:up - start] = v[lo - b * BLOCK:up - b * BLOCK]
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
    sel[(scores == t).nonzero()[:k - int(sel.sum()), 0]] = True
    return sel, float(t)


def naive_gather(scores: torch.Tensor, pool: Pool, k: int):
    """Gather every float32 chunk to rank 0 (padded to the largest chunk) and select there."""
    world = fdist.world_size()
    chunks = [pool.chunk(r, world) for r in range(world)]
    buf = torch.zeros(chunks[0][1] - chunks[0][0])
    buf[:scores.numel()] = scores
    parts = [torch.empty_like(buf) for _ in range(world)] if fdist.rank() == 0 else None
    dist.gather(buf, parts, dst=0)
    if fdist.rank() != 0:
        return None
    full = torch.cat([p[:e - s] for p, (s, e) in zip(parts, chunks)])
    return topk_lowest_index(full, k), full


def float_keys32(scores: torch.Tensor) -> torch.Tensor:
    """Prototype: the same key values as select.float_keys, as int32 (half the memory traffic)."""
    bits = scores.to(torch.float32).contiguous().view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def radix_topk(keys: torch.Tensor, k: int, width: int = 11) -> tuple[torch.Tensor, int]:
    """Prototype of exact_topk (same contract, int32 or int64 keys) by radix select.

    Each pass bins the candidates by the next `width` bits of key - lo and all-reduces the histogram
    (<= 2^width + 1 int64); the bin holding the k-th largest key becomes [lo, hi]. Float keys take 3
    passes: the first over the chunk, later ones over one bin. Ties keep their local indices.
    """
    keys = keys.reshape(-1)
    big = torch.iinfo(torch.int64).max
    lo_hi = torch.tensor([-(keys.min().item() if keys.numel() else big),
                          keys.max().item() if keys.numel() else -big], dtype=torch.int64)
    fdist.all_reduce_(lo_hi, op=dist.ReduceOp.MAX)
    lo, hi = -int(lo_hi[0]), int(lo_hi[1])
    total = int(fdist.all_reduce_(torch.tensor([keys.numel()]))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the pool size {total}")
    cand, idx, above = keys, None, 0  # above: global count of keys > hi
    while lo < hi:
        shift = max(0, (hi - lo).bit_length() - width)
        base = lo >> shift
        nb = (hi >> shift) - base + 1
        d = (cand >> shift).sub_(base)
        hist = fdist.all_reduce_(torch.bincount(d, minlength=nb))
        top = hist.flip(0).cumsum(0)  # top[j]: entries in the j + 1 highest bins
        j = int(torch.searchsorted(top, torch.tensor([k - above])))
        above += int(top[j - 1]) if j else 0
        lo, hi = max(lo, (base + nb - 1 - j) << shift), min(hi, ((base + nb - j) << shift) - 1)
        inside = (d == nb - 1 - j).nonzero()[:, 0]
        cand, idx = cand[inside], inside if idx is None else idx[inside]
    ties = torch.arange(keys.numel()) if idx is None else idx  # local indices with key == lo, ascending
    counts = torch.zeros(fdist.world_size(), dtype=torch.int64)
    counts[fdist.rank()] = ties.numel()
    fdist.all_reduce_(counts)
    take = max(0, min(ties.numel(), k - above - int(counts[:fdist.rank()].sum())))
    selected = keys > lo
    selected[ties[:take]] = True
    return selected, lo


def run_size(n: int, args) -> dict | None:
    pool = Pool([("scores", torch.nn.Parameter(torch.empty(n, device="meta"), requires_grad=False))])
    world, rank = fdist.world_size(), fdist.rank()
    k = pool.num_selected(args.keep_ratio, None)
    start, end = pool.chunk(rank, world)
    scores = scores_for(start, end, args.seed)
    keys, keys_s, _, _ = timed(lambda: float_keys(scores))
    (sel, thr), sec, nbytes, calls = timed(lambda: exact_topk(keys, k), args.repeat)
    del keys
    _, local_s, _, _ = timed(lambda: torch.topk(scores, min(k, scores.numel())), args.repeat)
    masks, share_s, share_bytes, _ = timed(lambda: share_selection(pool, sel))
    gathered, gather_s, gather_bytes, _ = timed(lambda: naive_gather(scores, pool, k))
    row = {"pool": n, "k": k, "world": world, "bytes_per_rank": nbytes, "seconds": round(sec, 4),
           "local_topk_seconds": round(local_s, 4), "ratio_to_local_topk": round(sec / local_s, 3),
           "gather_bytes": gather_bytes, "gather_seconds": round(gather_s, 4), "same_selection": None,
           "mask_share_bytes": share_bytes, "mask_share_seconds": round(share_s, 4),
           "keys_seconds": round(keys_s, 4), "collectives": calls}
    if args.prototype:
        keys32, pkeys_s, _, _ = timed(lambda: float_keys32(scores))
        (psel, pthr), psec, pbytes, pcalls = timed(lambda: radix_topk(keys32, k), args.repeat)
        pmask = share_selection(pool, psel)["scores"]
        row.update(proto_seconds=round(psec, 4), proto_ratio_to_local_topk=round(psec / local_s, 3),
                   proto_bytes_per_rank=pbytes, proto_collectives=pcalls, proto_keys_seconds=round(pkeys_s, 4))
    if rank != 0:
        return None
    (naive, t), full = gathered
    row["same_selection"] = torch.equal(masks["scores"], naive) and key_to_float(thr) == t
    row.update(threshold=t, n_above=int((full > t).sum()), n_tied=int((full == t).sum()))
    if args.prototype:
        row["proto_same_selection"] = torch.equal(pmask, naive) and pthr == thr
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="4e6,40e6,160e6", help="comma-separated pool sizes (floats allowed)")
    ap.add_argument("--keep_ratio", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="best of N for the timed top-k calls")
    ap.add_argument("--prototype", action="store_true", help="also time the radix-select prototype")
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

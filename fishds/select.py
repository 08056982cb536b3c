"""Exact global top-k over a score vector sharded across ranks, without gathering it.

Each rank holds a contiguous chunk of the pool's scores (see pool.Pool.chunk). Scores are mapped to
integer keys whose order is the float order; a bisection over the key range finds the k-th largest
key t with one all-reduced count per round. Entries with key > t are selected; of the entries with
key == t, the ones with the lowest global index fill the remaining places (an all-gather of one
count per rank). Communication: at most 34 all-reduces of one int64 plus one all-gather of one int64
per rank -- independent of the pool size. Work per rank: the candidates still in range are filtered
each round, about 2 passes over the local chunk for well-spread scores.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import dist as fdist

_MASK32 = 0xFFFFFFFF


def float_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the float32 values (NaN must be excluded beforehand)."""
    bits = scores.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def random_keys(start: int, end: int, seed: int) -> torch.Tensor:
    """Pseudo-random int64 keys for global indices [start, end), the same for any world size."""
    idx = torch.arange(start, end, dtype=torch.int64)
    salt = _hash32(_hash32(torch.tensor(seed & _MASK32) + 0x9E3779B1) ^ (seed >> 32))
    return _hash32(idx ^ _hash32((idx >> 32) ^ salt))


def _sum(x: int) -> int:
    t = torch.tensor([x], dtype=torch.int64)
    return int(fdist.all_reduce_(t)[0])


def key_to_float(key: int) -> float:
    """Inverse of float_keys for one key (to report the selection threshold as a score)."""
    bits = key if key >= 0 else (-(key + 1)) | 0x80000000
    return torch.tensor([bits & _MASK32], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def exact_topk(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Boolean selection of this rank's chunk: the global k largest keys, ties to the lowest global index.

    `keys` is this rank's contiguous chunk; chunks are ordered by rank. Every rank must call this.
    Returns the local selection and the k-th largest key (the threshold).
    """
    keys = keys.reshape(-1)
    big = torch.iinfo(torch.int64).max
    lo_hi = torch.tensor([-(keys.min().item() if keys.numel() else big),
                          keys.max().item() if keys.numel() else -big], dtype=torch.int64)
    fdist.all_reduce_(lo_hi, op=dist.ReduceOp.MAX)
    lo, hi = -int(lo_hi[0]), int(lo_hi[1])
    total = _sum(keys.numel())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the pool size {total}")
    # Invariant: count(keys >= lo) >= k; the answer t is the largest such value in [lo, hi].
    cand = keys
    above = 0  # entries known to be > hi on this rank
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        ge_local = cand >= mid
        if _sum(above + int(ge_local.sum())) >= k:
            lo = mid
            cand = cand[ge_local]
        else:
            hi = mid - 1
            above += int(ge_local.sum())
            cand = cand[~ge_local]
    t = lo
    gt = keys > t
    need = k - _sum(int(gt.sum()))
    ties = keys == t
    counts = torch.zeros(fdist.world_size(), dtype=torch.int64)
    counts[fdist.rank()] = int(ties.sum())
    fdist.all_reduce_(counts)
    before = int(counts[:fdist.rank()].sum())
    take = max(0, min(int(counts[fdist.rank()]), need - before))
    selected = gt
    if take:
        selected[ties.nonzero()[:take, 0]] = True
    return selected, t

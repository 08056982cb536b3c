"""Exact global top-k over a score vector sharded across ranks, without gathering it.

Each rank holds a contiguous chunk of the pool's scores (see pool.Pool.chunk). Scores are mapped to
integer keys whose order is the float order (int32: float_keys; any integer dtype is accepted). A radix
select finds the k-th largest key t: each round bins the remaining candidates by the next RADIX_BITS
bits of (key - lo), all-reduces the histogram (a fixed 2^RADIX_BITS + 1 int64 counts), and keeps only
the bin that holds the k-th largest key. Entries with key > t are selected; of the entries with
key == t, the ones with the lowest global index fill the remaining places (an all-reduce of one count
per rank). The same keys give the same mask bit for bit on any number of ranks.

Communication per rank, whatever the pool size: 16 B (global min/max) + 8 B (pool size) +
R x (2^RADIX_BITS + 1) x 8 B (histograms) + 8 B x world (tie counts), with R <= ceil(B / RADIX_BITS)
rounds, B the bit length of the global key range (max - min): B <= 32 for float_keys, so R <= 3 and
at most 49,200 + 8 x world bytes in R + 3 all-reduces (R <= 6 for arbitrary int64 keys).
Work per rank: one pass over the local chunk to bin it and one to pick the k-th key's bin; later rounds
touch only that bin's entries; then one compare over the chunk for the selection.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import dist as fdist

_MASK32 = 0xFFFFFFFF
RADIX_BITS = 11


def float_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values (NaN must be excluded beforehand).

    Non-negative floats keep their bit pattern; negative ones get their 31 low bits flipped, so that
    key order is float order (-0.0 sorts just below +0.0). key_to_float inverts one key.
    """
    bits = scores.to(torch.float32).contiguous().view(torch.int32)
    keys = bits >> 31  # -1 where negative, 0 elsewhere
    keys &= 0x7FFFFFFF
    keys ^= bits
    return keys


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


def key_to_float(key: int) -> float:
    """Inverse of float_keys for one key (to report the selection threshold as a score)."""
    bits = key if key >= 0 else (-(key + 1)) | 0x80000000
    return torch.tensor([bits & _MASK32], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def exact_topk(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Boolean selection of this rank's chunk: the global k largest keys, ties to the lowest global index.

    `keys` is this rank's contiguous chunk (any integer dtype); chunks are ordered by rank. Every rank
    must call this. Returns the local selection and the k-th largest key (the threshold).
    """
    keys = keys.reshape(-1)
    dev = keys.device
    big = torch.iinfo(torch.int64).max
    n = keys.numel()
    lo_hi = torch.tensor([-keys.min().item() if n else -big, keys.max().item() if n else -big],
                         dtype=torch.int64, device=dev)
    fdist.all_reduce_(lo_hi, op=dist.ReduceOp.MAX)
    lo, hi = -int(lo_hi[0]), int(lo_hi[1])
    total = int(fdist.all_reduce_(torch.tensor([n], dtype=torch.int64, device=dev))[0])
    if not 1 <= k <= total:
        raise ValueError(f"k={k} must be between 1 and the pool size {total}")
    nbins = (1 << RADIX_BITS) + 1  # (hi >> s) - (lo >> s) + 1 <= 2^RADIX_BITS + 1 for s = bitlen(hi - lo) - RADIX_BITS
    cand, idx, above = keys, None, 0  # idx: local indices of cand (None: all); above: global count of keys > hi
    while lo < hi:
        shift = max(0, (hi - lo).bit_length() - RADIX_BITS)
        base = lo >> shift
        d = cand >> shift
        d -= base  # bin of each candidate, 0 = lowest
        hist = fdist.all_reduce_(torch.bincount(d, minlength=nbins)).cpu()
        from_top = hist.flip(0).cumsum(0)  # from_top[j]: candidates in the j + 1 highest bins
        j = int(torch.searchsorted(from_top, torch.tensor([k - above])))  # first j with from_top[j] >= k - above
        b = nbins - 1 - j  # the bin holding the k-th largest key
        above += int(from_top[j - 1]) if j else 0
        lo, hi = max(lo, (base + b) << shift), min(hi, ((base + b + 1) << shift) - 1)
        inside = (d == b).nonzero().view(-1)
        del d
        cand = cand[inside]
        idx = inside if idx is None else idx[inside]
    ties = torch.arange(n, device=dev) if idx is None else idx  # local indices of key == lo, ascending
    counts = torch.zeros(fdist.world_size(), dtype=torch.int64, device=dev)
    counts[fdist.rank()] = ties.numel()
    fdist.all_reduce_(counts)
    take = max(0, min(ties.numel(), k - above - int(counts[:fdist.rank()].sum())))
    selected = keys > lo
    selected[ties[:take]] = True
    return selected, lo

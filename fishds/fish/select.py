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
    selected, thresholds = exact_topk_grouped(keys, None, [k])
    return selected, thresholds[0]


def exact_topk_grouped(keys: torch.Tensor, groups: torch.Tensor | None, quotas) -> tuple[torch.Tensor, list[int]]:
    """Per-group exact top-k in one radix select: group g keeps its quotas[g] largest keys (ties to the lowest
    global index), every group's histogram travelling in the same all-reduce of each round.

    `groups` gives the group id (0..G-1) of each entry of this rank's chunk (None: one group, G = 1; then no
    per-entry gathers happen, the plain global top-k). A quota of 0 selects nothing in its group. The same keys,
    groups and quotas give the same selection on any number of ranks. Traffic per round: G x (2^RADIX_BITS + 1)
    int64 counts. Returns the local selection and each group's threshold (its k-th largest key; for a quota of
    0, one above the group's largest key).
    """
    keys = keys.reshape(-1)
    dev = keys.device
    quotas = [int(q) for q in quotas]
    n_groups = len(quotas)
    if groups is not None and n_groups == 1:
        groups = None
    gid = None if groups is None else groups.reshape(-1).to(device=dev, dtype=torch.int64)

    def per_entry(values: torch.Tensor, index: torch.Tensor | None):
        """A per-group value for each entry: the scalar itself with one group, else a gather."""
        return int(values[0]) if index is None else values.to(dev)[index]

    big = torch.iinfo(torch.int64).max
    n = keys.numel()
    lo_hi = torch.full((2, n_groups), -big, dtype=torch.int64, device=dev)  # [-min, max] per group
    if n and gid is None:
        lo_hi[0, 0], lo_hi[1, 0] = -keys.min(), keys.max()
    elif n:
        k64 = keys.to(torch.int64)
        lo_hi[0].scatter_reduce_(0, gid, -k64, reduce="amax")
        lo_hi[1].scatter_reduce_(0, gid, k64, reduce="amax")
    fdist.all_reduce_(lo_hi, op=dist.ReduceOp.MAX)
    lo, hi = [-int(v) for v in lo_hi[0]], [int(v) for v in lo_hi[1]]
    sizes = torch.bincount(gid, minlength=n_groups) if gid is not None else torch.tensor([n], device=dev)
    totals = fdist.all_reduce_(sizes.to(torch.int64)).tolist()
    for g, (q, total) in enumerate(zip(quotas, totals)):
        if not (1 if n_groups == 1 else 0) <= q <= total:
            raise ValueError(
                f"k={q} must be between 1 and the pool size {total}"
                if n_groups == 1
                else f"the quota {q} of group {g} must be between 0 and its size {total}"
            )
    empty = [q == 0 for q in quotas]
    for g in range(n_groups):
        if empty[g]:
            lo[g] = hi[g] = (hi[g] + 1) if totals[g] else 0  # nothing is above it, nothing ties with it
    nbins = (1 << RADIX_BITS) + 1  # (hi >> s) - (lo >> s) + 1 <= 2^RADIX_BITS + 1 for s = bitlen(hi - lo) - RADIX_BITS
    above = [0] * n_groups  # per group: global count of its keys above the current [lo, hi]
    cand, cgid, idx = keys, gid, None  # idx: local indices of cand (None: all)
    if any(empty):  # quota-0 groups take no part in the rounds
        idx = (~torch.tensor(empty, device=dev)[gid]).nonzero().view(-1)
        cand, cgid = keys[idx], gid[idx]
    while any(a < b for a, b in zip(lo, hi)):
        shifts = [max(0, (b - a).bit_length() - RADIX_BITS) for a, b in zip(lo, hi)]
        bases = [a >> s for a, s in zip(lo, shifts)]
        d = cand >> per_entry(torch.tensor(shifts), cgid)
        d -= per_entry(torch.tensor(bases), cgid)  # bin of each candidate, 0 = lowest of its group
        # a converged group's candidates all equal its lo: their bin is 0, and bin 0 is kept below
        flat = d if cgid is None else cgid * nbins + d
        hist = fdist.all_reduce_(torch.bincount(flat, minlength=n_groups * nbins)).cpu().view(n_groups, nbins)
        keep_bin = [0] * n_groups
        for g in range(n_groups):
            if lo[g] == hi[g]:
                continue
            from_top = hist[g].flip(0).cumsum(0)  # from_top[j]: candidates in the j + 1 highest bins
            j = int(torch.searchsorted(from_top, torch.tensor([quotas[g] - above[g]])))
            b = nbins - 1 - j  # the bin holding the group's k-th largest key
            above[g] += int(from_top[j - 1]) if j else 0
            s, base = shifts[g], bases[g]
            lo[g], hi[g] = max(lo[g], (base + b) << s), min(hi[g], ((base + b + 1) << s) - 1)
            keep_bin[g] = b
        inside = (d == per_entry(torch.tensor(keep_bin), cgid)).nonzero().view(-1)
        del d, flat
        cand = cand[inside]
        cgid = None if cgid is None else cgid[inside]
        idx = inside if idx is None else idx[inside]
    ties = torch.arange(n, device=dev) if idx is None else idx  # local indices of key == lo, ascending
    tgid = torch.zeros(ties.numel(), dtype=torch.int64, device=dev) if gid is None else gid[ties]
    counts = torch.zeros(fdist.world_size(), n_groups, dtype=torch.int64, device=dev)
    counts[fdist.rank()] = torch.bincount(tgid, minlength=n_groups)
    fdist.all_reduce_(counts)
    before = counts[: fdist.rank()].sum(0).cpu()
    take = torch.tensor(
        [max(0, min(int(counts[fdist.rank(), g]), quotas[g] - above[g] - int(before[g]))) for g in range(n_groups)],
        device=dev,
    )
    selected = keys > per_entry(torch.tensor(lo), gid)
    if gid is None:
        selected[ties[: int(take[0])]] = True
    elif ties.numel():
        order = torch.argsort(tgid, stable=True)  # ties by group, ascending local index inside each group
        sorted_gid = tgid[order]
        first = torch.searchsorted(sorted_gid, torch.arange(n_groups, device=dev))
        position = torch.arange(ties.numel(), device=dev) - first[sorted_gid]
        selected[ties[order][position < take[sorted_gid]]] = True
    return selected, lo

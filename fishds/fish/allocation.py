"""Allocation rules (`fish.allocation`): how k is shared out over the pool before the top-k. A table, name ->
function returning (group id of each entry of this rank's chunk, or None for one group; the quota of each group).

| allocation | groups | quotas |
|---|---|---|
| global | one | k (the paper: one top-k over the pool) |
| tensor | pool tensors | k in proportion to each tensor's size (largest remainders) |
| module | adapted modules (LoRA A + B) | by the module's summed score, >= fish.min_density x k / pool size each |
| ab_balanced | pool tensors | a module's count in a global top-k, split over its tensors by size (A, B equal density) |

Every quota is an exact integer, the quotas sum to k, and they are computed from world-size-independent inputs
(sizes, exact integer counts, and score sums made exact by exact_group_sums), so the mask is the same bit for bit
on any number of ranks. The per-group sums travel as one small all-reduce (groups x 256 int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from .. import dist as fdist
from .keys import kind_of, layer_of  # noqa: F401  (adapter keys are parsed in fishds/fish/keys.py alone)
from .keys import module_path as module_of
from .pool import Pool
from .select import exact_topk


def tensor_groups(pool: Pool, start: int, end: int) -> torch.Tensor:
    """The pool-tensor index of every entry of the chunk [start, end)."""
    ids, counts = [], []
    for i, t in enumerate(pool.tensors):
        n = min(end, t.offset + t.numel) - max(start, t.offset)
        if n > 0:
            ids.append(i)
            counts.append(n)
    if not ids:
        return torch.zeros(0, dtype=torch.int64)
    return torch.repeat_interleave(torch.tensor(ids), torch.tensor(counts))


def modules(pool: Pool) -> tuple[list[str], list[int]]:
    """The adapted modules in pool order, and each pool tensor's module index."""
    names = list(dict.fromkeys(module_of(t.name) for t in pool.tensors))
    return names, [names.index(module_of(t.name)) for t in pool.tensors]


def exact_group_sums(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> list[int]:
    """Per-group sums of non-negative finite fp32 values, exact and independent of how the pool is split into
    ranks: each value is m x 2^(e - 150) (m its 24-bit mantissa, e its biased exponent), the mantissas are summed
    as int64 per (group, exponent) and all-reduced, then combined in Python integers. Returns sum x 2^149 per
    group as an int (exact; compare and divide these, or use math.ldexp(float(s), -149))."""
    bits = values.detach().to(torch.float32).contiguous().view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    e = bits >> 23
    m = (bits & 0x7FFFFF) | ((e > 0).to(torch.int64) << 23)
    acc = torch.zeros(n_groups * 256, dtype=torch.int64)
    acc.index_add_(0, groups.to(torch.int64) * 256 + e.clamp(min=1), m)
    fdist.all_reduce_(acc)
    return [sum(int(c) << (ex - 1) for ex, c in enumerate(row) if c) for row in acc.view(n_groups, 256).tolist()]


def selected_per_tensor(pool: Pool, start: int, end: int, local_selected: torch.Tensor) -> list[int]:
    """How many entries of each pool tensor a distributed selection holds (exact counts, one all-reduce)."""
    counts = torch.bincount(tensor_groups(pool, start, end)[local_selected.reshape(-1)], minlength=len(pool.tensors))
    return [int(c) for c in fdist.all_reduce_(counts.to(torch.int64))]


def proportional_quotas(total: int, weights, caps, floors=None) -> list[int]:
    """Integers q_i with floors_i <= q_i <= caps_i and sum q_i = total, the part above the floors in proportion to
    the weights (exact fractions; a group whose share exceeds its room is filled and the rest re-shared), rounded by
    largest remainders (ties to the lower index). All-zero weights share in proportion to the room left."""
    n = len(caps)
    floors = list(floors) if floors is not None else [0] * n
    room = [c - f for c, f in zip(caps, floors)]
    rest = total - sum(floors)
    if min(room, default=0) < 0 or not 0 <= rest <= sum(room):
        raise ValueError(f"cannot share {total} over groups with floors {sum(floors)} and capacity {sum(caps)}")
    weights = [Fraction(w) for w in weights]
    extra = [Fraction(0)] * n
    open_ = [i for i in range(n) if room[i] > 0]
    if not any(weights[i] for i in open_):
        weights = [Fraction(r) for r in room]
    while rest and open_:
        w = sum(weights[i] for i in open_)
        if w == 0:
            weights = [Fraction(r) if i in open_ else weights[i] for i, r in enumerate(room)]
            continue
        full = [i for i in open_ if rest * weights[i] / w >= room[i]]
        if not full:
            for i in open_:
                extra[i] = rest * weights[i] / w
            break
        for i in full:
            extra[i] = Fraction(room[i])
            rest -= room[i]
        open_ = [i for i in open_ if i not in full]
    quotas = [floors[i] + math.floor(extra[i]) for i in range(n)]
    left = total - sum(quotas)
    order = sorted(range(n), key=lambda i: (-(extra[i] - math.floor(extra[i])), i))
    for i in order[:left]:
        quotas[i] += 1
    assert sum(quotas) == total and all(f <= q <= c for f, q, c in zip(floors, quotas, caps))
    return quotas


@dataclass
class AllocationContext:
    pool: Pool
    k: int
    start: int
    end: int
    values: torch.Tensor | None  # this rank's chunk of the score values (None for random keys)
    keys: torch.Tensor  # this rank's chunk of the selection keys (largest first)
    fish: object  # the config's fish section
    info: dict


def _global(ctx: AllocationContext):
    return None, [ctx.k]


def _tensor(ctx: AllocationContext):
    sizes = [t.numel for t in ctx.pool.tensors]
    return tensor_groups(ctx.pool, ctx.start, ctx.end), proportional_quotas(ctx.k, sizes, sizes)


def _module(ctx: AllocationContext):
    pool = ctx.pool
    names, of_tensor = modules(pool)
    tg = tensor_groups(pool, ctx.start, ctx.end)
    of_entry = torch.tensor(of_tensor, dtype=torch.int64)[tg] if tg.numel() else tg
    importance = exact_group_sums(ctx.values, of_entry, len(names))
    sizes = [0] * len(names)
    for t, m in zip(pool.tensors, of_tensor):
        sizes[m] += t.numel
    density = Fraction(ctx.fish.min_density) * Fraction(ctx.k, pool.size)
    floors = [min(s, math.floor(density * s)) for s in sizes]
    quotas = proportional_quotas(ctx.k, importance, sizes, floors)
    total = sum(importance)
    ctx.info["module_importance"] = {n: (i / total if total else 0.0) for n, i in zip(names, importance)}
    return of_entry, quotas


def _ab_balanced(ctx: AllocationContext):
    pool = ctx.pool
    names, of_tensor = modules(pool)
    per_tensor = selected_per_tensor(pool, ctx.start, ctx.end, exact_topk(ctx.keys, ctx.k)[0])
    quotas = [0] * len(pool.tensors)
    for m in range(len(names)):
        members = [i for i, mi in enumerate(of_tensor) if mi == m]
        sizes = [pool.tensors[i].numel for i in members]
        for i, q in zip(members, proportional_quotas(sum(per_tensor[i] for i in members), sizes, sizes)):
            quotas[i] = q
    return tensor_groups(pool, ctx.start, ctx.end), quotas


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """One `fish.allocation`: its doc (the config reference's line) and what it needs of the score."""

    name: str
    doc: str
    groups_and_quotas: Callable[[AllocationContext], tuple[torch.Tensor | None, list[int]]]
    needs_values: str | None = None  # why it needs score values (random keys have none), or None


ALLOCATIONS: dict[str, Allocation] = {
    a.name: a
    for a in (
        Allocation(name="global", doc="one top-k over the pool, the paper", groups_and_quotas=_global),
        Allocation(name="tensor", doc="each pool tensor gets k in proportion to its size", groups_and_quotas=_tensor),
        Allocation(
            name="module",
            doc="per adapted module, in proportion to its summed score, at least fish.min_density x the uniform "
            "density",
            groups_and_quotas=_module,
            needs_values="shares k by the modules' summed scores",
        ),
        Allocation(
            name="ab_balanced",
            doc="each module gets what a global top-k gives it, split over its tensors (LoRA A and B) at equal density",
            groups_and_quotas=_ab_balanced,
        ),
    )
}


def allocation_report(pool: Pool, masks: dict[str, torch.Tensor]) -> dict:
    """Where the mask landed: selected / size per adapted module and per layer, and the row and column coverage of
    every 2-D pool tensor (the share of rows and of columns holding at least one selected entry), also summed per
    kind (lora_A: rows = rank, columns = input features; lora_B: rows = output features, columns = rank)."""
    per_layer, per_adapted, coverage, per_tensor = {}, {}, {}, {}
    for t in pool.tensors:
        m = masks[t.name]
        sel = int(m.sum())
        for table, key in ((per_layer, layer_of(t.name)), (per_adapted, module_of(t.name))):
            row = table.setdefault(key, {"selected": 0, "numel": 0})
            row["selected"] += sel
            row["numel"] += t.numel
        if m.dim() == 2:
            rows, cols = int(m.any(1).sum()), int(m.any(0).sum())
            per_tensor[t.name] = {"rows_covered": rows, "rows": m.shape[0], "cols_covered": cols, "cols": m.shape[1]}
            c = coverage.setdefault(kind_of(t.name), {"rows_covered": 0, "rows": 0, "cols_covered": 0, "cols": 0})
            for key, v in per_tensor[t.name].items():
                c[key] += v
    for c in coverage.values():
        c["row_share"] = c["rows_covered"] / c["rows"] if c["rows"] else 0.0
        c["col_share"] = c["cols_covered"] / c["cols"] if c["cols"] else 0.0
    return {
        "per_layer": per_layer,
        "per_adapted_module": per_adapted,
        "coverage": coverage,
        "coverage_per_tensor": per_tensor,
    }

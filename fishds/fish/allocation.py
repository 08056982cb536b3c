"""Allocation rules (`fish.allocation`): how k is shared out over the pool before the top-k. A table, name ->
function returning (group id of each entry of this rank's chunk, or None for one group; the quota of each group).

| allocation | groups | quotas |
|---|---|---|
| global | one | k (the paper: one top-k over the pool) |
| tensor | pool tensors | k in proportion to each tensor's size (largest remainders) |
| module | adapted modules (LoRA A + B) | by the module's summed score, >= fish.min_density x k / pool size each |
| ab_balanced | pool tensors | a module's count in a global top-k, split over its tensors by size (A, B equal density) |
| rank | LoRA rank components (row j of lora_A + column j of lora_B) | r_keep whole components per module |
| row | rows of lora_B (output features) | m entries per row |

rank and row are structured: they select themselves (Allocation.select) instead of giving groups and quotas to the
radix select, since their groups (components, rows) number in the tens of thousands to millions at 7B. rank sums
each component's scores exactly (exact_group_sums, components x 256 int64 all-reduced once: 29 MB for 14,336
components, LoRA r=64 on 7 modules x 32 layers) and picks r_keep per module on every rank; row runs a per-row top-m on
the rows inside this rank's chunk and exchanges only the rows cut by a chunk boundary (at most 2 per rank).

Every quota is an exact integer, the quotas sum to k, and they are computed from world-size-independent inputs
(sizes, exact integer counts, and score sums made exact by exact_group_sums), so the mask is the same bit for bit
on any number of ranks. The per-group sums travel as one small all-reduce (groups x 256 int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Callable

import torch

from .. import dist as fdist
from ..schema import ConfigError
from .keys import kind_of, layer_of  # noqa: F401  (adapter keys are parsed in fishds/fish/keys.py alone)
from .keys import module_path as module_of
from .pool import Pool
from .select import exact_topk, exact_topk_grouped, random_keys


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
    reverse: bool = False  # keys are reversed (fish.control=bottom): structured allocations reverse their sums too
    component_power: int = 1  # a component's score is the sum of its entries' values to this power (scores.py)


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


# ---- structured allocations: whole LoRA rank components, quotas per lora_B row -----------------------------------


@dataclass(frozen=True)
class LoraModule:
    name: str  # the adapted module
    a: int | None  # pool tensor index of its lora_A (None: outside the pool, e.g. fish.freeze: [lora_A])
    b: int  # pool tensor index of its lora_B
    r: int  # rank (lora_B's columns)
    base: int  # global id of its component 0


def lora_modules(pool: Pool, allocation: str) -> list[LoraModule]:
    """The adapted modules of a pool made of LoRA factors only (ConfigError naming fish.allocation otherwise)."""
    names, of_tensor = modules(pool)
    a, b = {}, {}
    for i, t in enumerate(pool.tensors):
        kind = kind_of(t.name)
        if kind not in ("lora_A", "lora_B") or len(t.shape) != 2:
            raise ConfigError(
                f"fish.allocation={allocation} works on LoRA factors only; the pool tensor {t.name} is neither "
                "lora_A nor lora_B: leave it out of the pool (fish.freeze or fish.pool_exclude)"
            )
        (a if kind == "lora_A" else b)[of_tensor[i]] = i
    out, base = [], 0
    for m, name in enumerate(names):
        if m not in b:
            raise ConfigError(
                f"fish.allocation={allocation}: module {name} has no lora_B in the pool; its lora_B must be trainable"
            )
        r = pool.tensors[b[m]].shape[1]
        if m in a and pool.tensors[a[m]].shape[0] != r:
            raise ConfigError(f"fish.allocation={allocation}: {name}'s lora_A and lora_B disagree on the rank")
        out.append(LoraModule(name, a.get(m), b[m], r, base))
        base += r
    return out


def _component_entries(pool: Pool, mods: list[LoraModule]) -> int:
    """Pool entries per rank component, summed over the modules (every module keeps r_keep components)."""
    return sum(pool.tensors[m.b].shape[0] + (pool.tensors[m.a].shape[1] if m.a is not None else 0) for m in mods)


def rank_keep(pool: Pool, k: int) -> int:
    """r_keep of fish.allocation=rank: k must be r_keep whole components in every module."""
    mods = lora_modules(pool, "rank")
    per = _component_entries(pool, mods)
    r_min = min(m.r for m in mods)
    if k % per or not 1 <= k // per <= r_min:
        raise ConfigError(
            f"fish.allocation=rank keeps r_keep whole rank components (row j of lora_A and column j of lora_B) in "
            f"every module: k must be r_keep x {per:,} with 1 <= r_keep <= {r_min}, the budget gives k={k:,}; use "
            "fish.budget=match_rank with fish.match_r=r_keep, or fish.keep_ratio with keep_ratio x peft.r whole"
        )
    return k // per


def row_keep(pool: Pool, k: int) -> int:
    """m of fish.allocation=row: k must be m entries in every lora_B row of the pool."""
    mods = lora_modules(pool, "row")
    if any(m.a is not None for m in mods):
        raise ConfigError(
            "fish.allocation=row gives each lora_B row a quota with lora_A fixed at its initialisation: take lora_A "
            "out of the pool with fish.freeze: [lora_A]"
        )
    rows = sum(pool.tensors[m.b].shape[0] for m in mods)
    r_min = min(m.r for m in mods)
    if k % rows or not 1 <= k // rows <= r_min:
        raise ConfigError(
            f"fish.allocation=row keeps m entries in each of the {rows:,} lora_B rows (1 <= m <= {r_min}); the budget "
            f"gives k={k:,}: use fish.budget=match_rank (m = fish.match_r) or fish.keep_ratio with keep_ratio x "
            "peft.r whole"
        )
    return k // rows


def _component_ids(pool: Pool, mods: list[LoraModule], start: int, end: int) -> torch.Tensor:
    """The global component id of every entry of the chunk [start, end) (lora_B (i, j) and lora_A (j, c): j)."""
    of = {}
    for m in mods:
        of[m.b] = (m, "B")
        if m.a is not None:
            of[m.a] = (m, "A")
    parts = []
    for i, t in enumerate(pool.tensors):
        a, b = max(start, t.offset), min(end, t.offset + t.numel)
        if a >= b:
            continue
        m, kind = of[i]
        flat = torch.arange(a - t.offset, b - t.offset, dtype=torch.int64)
        j = flat % m.r if kind == "B" else flat // t.shape[1]
        parts.append(j + m.base)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def _is_b(pool: Pool, mods: list[LoraModule], start: int, end: int) -> torch.Tensor:
    bs = {m.b for m in mods}
    parts = [
        torch.full((min(end, t.offset + t.numel) - max(start, t.offset),), i in bs, dtype=torch.bool)
        for i, t in enumerate(pool.tensors)
        if max(start, t.offset) < min(end, t.offset + t.numel)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _rank_select(ctx: AllocationContext) -> torch.Tensor:
    """r_keep whole components per module, by the exact sum over a component's lora_B column of the entries' values
    (to ctx.component_power); random keys (values None): a seeded hash of the component's id."""
    pool = ctx.pool
    mods = lora_modules(pool, "rank")
    r_keep = rank_keep(pool, ctx.k)
    n_comp = sum(m.r for m in mods)
    comp = _component_ids(pool, mods, ctx.start, ctx.end)
    if ctx.values is None:
        order_key = [int(v) for v in random_keys(0, n_comp, ctx.fish.seed)]
    else:
        in_b = _is_b(pool, mods, ctx.start, ctx.end)
        v = ctx.values[in_b].to(torch.float32)
        if ctx.component_power != 1:
            v = v.pow(ctx.component_power)
        order_key = exact_group_sums(v, comp[in_b], n_comp)
    keep = torch.zeros(n_comp, dtype=torch.bool)
    chosen = {}
    for m in mods:
        js = range(m.r)
        sign = 1 if ctx.reverse else -1  # largest first; reversed (bottom): smallest first; ties: lowest j
        best = sorted(js, key=lambda j: (sign * order_key[m.base + j], j))[:r_keep]
        keep[[m.base + j for j in best]] = True
        chosen[m.name] = sorted(best)
    ctx.info["r_keep"] = r_keep
    ctx.info["components"] = chosen
    return keep[comp]


def row_local(pool: Pool, keys: torch.Tensor, start: int, end: int, m_keep: int) -> tuple[torch.Tensor, list]:
    """The per-row top-m of the whole lora_B rows inside the chunk [start, end) (a stable descending sort per row:
    ties to the lowest index), and the rows the chunk holds only part of: (tensor index, row, offset, keys)."""
    keys = keys.reshape(-1)
    selected = torch.zeros(end - start, dtype=torch.bool)
    cut = []
    for i, t in enumerate(pool.tensors):
        a, b = max(start, t.offset), min(end, t.offset + t.numel)
        if a >= b:
            continue
        r = t.shape[1]
        lo, hi = a - t.offset, b - t.offset  # flat range of this tensor in the chunk
        first, last = -(-lo // r), hi // r  # whole rows [first, last)
        if first < last:
            at = a - start + first * r - lo
            block = keys[at : at + (last - first) * r].view(-1, r)
            top = torch.sort(block, dim=1, descending=True, stable=True).indices[:, :m_keep]
            selected[at : at + (last - first) * r] = (
                torch.zeros_like(block, dtype=torch.bool).scatter_(1, top, True).view(-1)
            )
        for row in sorted({lo // r, (hi - 1) // r}):
            r0, r1 = max(lo, row * r), min(hi, (row + 1) * r)
            if r1 - r0 < r:
                cut.append((i, row, r0 - row * r, keys[a - start + r0 - lo : a - start + r1 - lo].tolist()))
    return selected, cut


def row_cut(pool: Pool, parts: list[list], start: int, end: int, selected: torch.Tensor, m_keep: int) -> None:
    """Decide the rows cut by chunk boundaries from every rank's pieces (`parts`, one list per rank, the same on
    every rank) and mark this chunk's share of them in `selected`."""
    rows: dict[tuple[int, int], dict[int, int]] = {}
    for part in parts:
        for i, row, off, ks in part:
            rows.setdefault((i, row), {}).update({off + n: key for n, key in enumerate(ks)})
    for (i, row), by_off in rows.items():
        t = pool.tensors[i]
        if len(by_off) != t.shape[1]:
            raise RuntimeError(f"row {row} of {t.name}: the ranks' pieces do not cover it")
        for off in sorted(by_off, key=lambda o: (-by_off[o], o))[:m_keep]:
            g = t.offset + row * t.shape[1] + off
            if start <= g < end:
                selected[g - start] = True


def _row_select(ctx: AllocationContext) -> torch.Tensor:
    """m entries per lora_B row: row_local on this chunk's whole rows; the (at most 2) rows a chunk boundary cuts
    travel to every rank (all_gather_object, a few keys each) and are decided identically everywhere (row_cut)."""
    import torch.distributed as dist

    m_keep = row_keep(ctx.pool, ctx.k)
    selected, cut = row_local(ctx.pool, ctx.keys, ctx.start, ctx.end, m_keep)
    parts = [cut]
    if fdist.world_size() > 1:
        parts = [None] * fdist.world_size()
        dist.all_gather_object(parts, cut)
    row_cut(ctx.pool, parts, ctx.start, ctx.end, selected, m_keep)
    ctx.info["row_quota"] = m_keep
    return selected


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """One `fish.allocation`: its doc (the config reference's line) and what it needs of the score."""

    name: str
    doc: str
    groups_and_quotas: Callable[[AllocationContext], tuple[torch.Tensor | None, list[int]]] | None = None
    select: Callable[[AllocationContext], torch.Tensor] | None = None  # structured: this rank's selection itself
    check: Callable[[Pool, int], object] | None = None  # (pool, k): ConfigError before any scoring when k cannot fit
    needs_values: str | None = None  # why it needs score values (random keys have none), or None
    scores_at_init: bool = False  # fish.dense_steps defaults to 0: its scores are meant at LoRA's initialisation
    methods: tuple[str, ...] | None = None  # the peft.method values it supports (None: every method)

    def local_selection(self, ctx: AllocationContext) -> tuple[torch.Tensor, list[int] | None]:
        """This rank's selection of its chunk, and the groups' thresholds (None for a structured allocation)."""
        if self.select is not None:
            return self.select(ctx), None
        groups, quotas = self.groups_and_quotas(ctx)
        return exact_topk_grouped(ctx.keys, groups, quotas)

    def random_like(self, ctx: AllocationContext) -> torch.Tensor:
        """Its structure with random choices (fish.control=random_matched for a structured allocation)."""
        rnd = replace(ctx, values=None, keys=random_keys(ctx.start, ctx.end, ctx.fish.seed), reverse=False)
        return self.select(rnd)


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
        Allocation(
            name="rank",
            doc="LoRA rank components (row j of lora_A with column j of lora_B): the r_keep best per module by the "
            "summed score of the component's lora_B column (fish.score grad: its norm); the saved adapter is a plain "
            "LoRA of rank r_keep",
            select=_rank_select,
            check=rank_keep,
            scores_at_init=True,
            methods=("lora", "rslora"),
        ),
        Allocation(
            name="row",
            doc="m entries in every row (output feature) of lora_B, lora_A outside the pool (fish.freeze: [lora_A])",
            select=_row_select,
            check=row_keep,
            scores_at_init=True,
            methods=("lora", "rslora", "dora", "pissa", "olora"),
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

"""exact_topk (radix select) against a reference sort with index tie-break: heavy ties, k at the edges, 1 and 2
ranks."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fishds.fish.select import exact_topk, exact_topk_grouped, float_keys, key_to_float, random_keys


def _reference(keys: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys, ties to the lowest index (numpy lexsort: key descending, then index)."""
    kk = keys.to(torch.int64).numpy()
    order = np.lexsort((np.arange(kk.size), -kk))[:k]
    ref = torch.zeros(kk.size, dtype=torch.bool)
    ref[torch.from_numpy(order)] = True
    return ref


def _cases() -> list[tuple[str, torch.Tensor, int]]:
    """(name, full key vector, k): ties everywhere, k = 1, k = n, k inside and at the edge of a tie group."""
    g = torch.Generator().manual_seed(0)
    out = []
    vals = torch.tensor([0.0, 0.0, 0.0, 0.125, 0.5, 0.5, 1.0, -2.0, float("inf")])
    tied = vals[torch.randint(0, len(vals), (1001,), generator=g)]
    tied[::7] = torch.rand(tied[::7].shape, generator=g)
    spread = torch.randn(3000, generator=g)
    for name, s in (
        ("tied", tied),
        ("spread", spread),
        ("all_equal", torch.full((77,), 0.3)),
        ("zeros_and_one", torch.cat([torch.zeros(500), torch.ones(1), torch.zeros(20)])),
    ):
        keys = float_keys(s)
        n = keys.numel()
        srt = keys.sort(descending=True).values
        ks = {1, n, n - 1, max(1, n // 2)}
        for t in srt.unique()[-4:].tolist():  # the 4 largest tie groups by value: split them and hit their edges
            above, tie = int((keys > t).sum()), int((keys == t).sum())
            ks |= {above + 1, above + tie, above + (tie + 1) // 2}
        out += [(f"{name}-k{k}", keys, k) for k in sorted(x for x in ks if 1 <= x <= n)]
    wide = torch.randint(-(1 << 40), 1 << 40, (2000,), generator=g)  # int64, > 32-bit range: more radix rounds
    wide[::3] = 12345
    out += [
        ("int64_wide-k1", wide, 1),
        ("int64_wide-ktie", wide, int((wide > 12345).sum()) + 300),
        ("random_keys", random_keys(0, 5000, 7), 1234),
    ]
    return out


def _grouped_reference(keys: torch.Tensor, groups: torch.Tensor, quotas: list[int]) -> torch.Tensor:
    ref = torch.zeros(keys.numel(), dtype=torch.bool)
    for g, q in enumerate(quotas):
        members = (groups == g).nonzero().view(-1)
        if q:
            ref[members[_reference(keys[members], q)]] = True
    return ref


def _grouped_cases() -> list[tuple[str, torch.Tensor, torch.Tensor, list[int]]]:
    """(name, keys, group ids, quotas): interleaved and contiguous groups, quotas 0, 1, all, inside tie groups."""
    g = torch.Generator().manual_seed(1)
    vals = torch.tensor([0.0, 0.0, 0.25, 0.5, 0.5, 1.0, -1.0])
    keys = float_keys(
        vals[torch.randint(0, len(vals), (1500,), generator=g)]
        + (torch.rand(1500, generator=g) > 0.8) * torch.rand(1500, generator=g)
    )
    interleaved = torch.randint(0, 5, (1500,), generator=g)
    contiguous = torch.arange(1500) // 300  # like per-tensor groups of a pool
    out = []
    for name, groups in (("interleaved", interleaved), ("contiguous", contiguous)):
        sizes = torch.bincount(groups, minlength=5).tolist()
        for quotas in (
            [1, 0, sizes[2], 37, sizes[4] // 2],
            [sizes[0] // 3, 2, 0, 0, sizes[4]],
            [s // 4 + 1 for s in sizes],
        ):
            out.append((f"{name}-{quotas}", keys, groups, quotas))
    out.append(("one-group", keys, torch.zeros(1500, dtype=torch.int64), [400]))
    return out


@pytest.mark.parametrize("case", range(len(_grouped_cases())), ids=[c[0] for c in _grouped_cases()])
def test_grouped_topk_one_rank_matches_per_group_sort(case):
    _, keys, groups, quotas = _grouped_cases()[case]
    sel, thresholds = exact_topk_grouped(keys, groups, quotas)
    ref = _grouped_reference(keys, groups, quotas)
    assert torch.equal(sel, ref)
    assert [int(sel[groups == g].sum()) for g in range(len(quotas))] == quotas
    for g, q in enumerate(quotas):
        if q:
            assert thresholds[g] == int(keys[ref & (groups == g)].min())
    assert torch.equal(exact_topk_grouped(keys, None, [400])[0], exact_topk(keys, 400)[0])


def test_grouped_topk_rejects_bad_quotas():
    keys, groups = float_keys(torch.rand(10)), torch.tensor([0] * 6 + [1] * 4)
    with pytest.raises(ValueError, match="group 1"):
        exact_topk_grouped(keys, groups, [2, 5])


def test_float_keys_order_and_inverse():
    x = torch.tensor([-float("inf"), -3.5, -1e-30, -0.0, 0.0, 1e-38, 0.125, 0.5, 7.0, float("inf")])
    keys = float_keys(x)
    assert keys.dtype == torch.int32 and bool((keys[1:] > keys[:-1]).all())
    assert [key_to_float(int(v)) for v in keys] == x.tolist()


@pytest.mark.parametrize("case", range(len(_cases())), ids=[c[0] for c in _cases()])
def test_exact_topk_one_rank_matches_reference_sort(case):
    _, keys, k = _cases()[case]
    sel, t = exact_topk(keys, k)
    ref = _reference(keys, k)
    assert int(sel.sum()) == k and torch.equal(sel, ref)
    assert t == int(keys[ref].min())


def _worker(rank: int, world: int, port: int, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, keys, k in _cases():
            n = keys.numel()
            # even chunks (pool.chunk style), a lopsided split, and everything on rank 0 (rank 1 empty)
            for cut in (-(-n // world), n // 5, n):
                start, end = (0, cut) if rank == 0 else (cut, n)
                sel, t = exact_topk(keys[start:end], k)
                parts = [torch.zeros(n, dtype=torch.bool) for _ in range(world)]
                local = torch.zeros(n, dtype=torch.bool)
                local[start:end] = sel
                dist.all_gather(parts, local)
                full = torch.stack(parts).any(0)
                ref = _reference(keys, k)
                if not (torch.equal(full, ref) and t == int(keys[ref].min())):
                    errors.put(f"{name} cut={cut} rank={rank}")
        for name, keys, groups, quotas in _grouped_cases():
            n = keys.numel()
            for cut in (-(-n // world), n // 7, n):
                start, end = (0, cut) if rank == 0 else (cut, n)
                sel, _ = exact_topk_grouped(keys[start:end], groups[start:end], quotas)
                parts = [torch.zeros(n, dtype=torch.bool) for _ in range(world)]
                local = torch.zeros(n, dtype=torch.bool)
                local[start:end] = sel
                dist.all_gather(parts, local)
                if not torch.equal(torch.stack(parts).any(0), _grouped_reference(keys, groups, quotas)):
                    errors.put(f"grouped {name} cut={cut} rank={rank}")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {e!r}")
    finally:
        dist.destroy_process_group()


def test_exact_topk_two_ranks_matches_reference_sort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, port, errors), nprocs=2, start_method="spawn")
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found

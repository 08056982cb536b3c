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

from fishds.fish.select import exact_topk, float_keys, key_to_float, random_keys


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
    for name, s in (("tied", tied), ("spread", spread), ("all_equal", torch.full((77,), 0.3)),
                    ("zeros_and_one", torch.cat([torch.zeros(500), torch.ones(1), torch.zeros(20)]))):
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
    out += [("int64_wide-k1", wide, 1), ("int64_wide-ktie", wide, int((wide > 12345).sum()) + 300),
            ("random_keys", random_keys(0, 5000, 7), 1234)]
    return out


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

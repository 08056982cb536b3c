"""Empirical Fisher scores of the pool, collected on sharded models without reducing gradients first.

F[j] = sum over the N scoring examples of (dL(x_i, y_i)/d theta_j)^2   (granularity "sample", the paper)
F[j] = sum over micro-batches b of (dL_b/d theta_j)^2                     (granularity "batch", cheaper)

The N examples are dealt round-robin to the ranks, so each counts exactly once. Each rank calls the wrapped module
(ZeRO-3 still gathers weights through its module hooks) and takes the local gradient of the pool parameters with torch.autograd.grad: it has full shape on every ZeRO stage
(ZeRO-3 gathers the weights for the forward and backward), is never reduced across ranks, and no
gradient of the frozen base weights is computed. Squares are summed into an fp32 accumulator in pool
order, held as one tensor per owner chunk (pool.chunk). At the end each chunk is reduced once to the
rank that owns it, in pieces of at most REDUCE_PIECE entries, and a rank frees every chunk it does not
own right after reducing it, so the accumulator never grows during the reduction and after the pass a
rank keeps only its own chunk of the scores (<= ceil(pool / world) rounded up to 8 entries, fp32).
Ranks with fewer examples run the same number of forward/backward passes (weight 0) so that ZeRO-3's
collectives stay matched.

Memory during the pass, per rank: the accumulator (pool x 4 bytes: a local per-example gradient has
the full shape, so its squares cannot be split before the one reduction without reducing every pass)
plus the gradients of one pass (pool x the parameter dtype's bytes, freed after each pass). The
statistics collect_scores returns record both peaks and what is held after the reduction.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist

from .. import dist as fdist
from .pool import Pool


REDUCE_PIECE = 1 << 24  # entries per reduce call (64 MiB of fp32): bounds any staging buffer of the backend


class FisherError(RuntimeError):
    pass


def _segments(pool: Pool, bounds: list[tuple[int, int]]) -> list[list[tuple[int, int, int, int, int]]]:
    """Per pool tensor: (owner rank, start and end in the owner's chunk, start and end in the flat tensor)."""
    out = []
    for t in pool.tensors:
        parts = []
        for r, (s, e) in enumerate(bounds):
            a, b = max(s, t.offset), min(e, t.offset + t.numel)
            if a < b:
                parts.append((r, a - s, b - s, a - t.offset, b - t.offset))
        out.append(parts)
    return out


def _passes(n: int, granularity: str, micro_batch_size: int) -> list[list[int]]:
    """This rank's list of example-index groups, one group per backward pass (round-robin over ranks)."""
    mine = list(range(fdist.rank(), n, fdist.world_size()))
    size = 1 if granularity == "sample" else micro_batch_size
    groups = [mine[i:i + size] for i in range(0, len(mine), size)]
    per_rank = -(-n // fdist.world_size())
    total = math.ceil(per_rank / size)
    while len(groups) < total:
        groups.append([])  # dummy pass, contributes nothing
    return groups


def collect_scores(engine, pool: Pool, examples: list[dict], granularity: str, micro_batch_size: int,
                   collate: Callable[[list[dict]], dict], progress=None) -> tuple[torch.Tensor, dict]:
    """Run the Fisher pass; return this rank's chunk of the scores (fp32) and timing statistics."""
    (scores,), stats = collect_moments(engine, pool, examples, granularity, micro_batch_size, collate, progress)
    return scores, stats


def collect_moments(engine, pool: Pool, examples: list[dict], granularity: str, micro_batch_size: int,
                    collate: Callable[[list[dict]], dict], progress=None, with_sum: bool = False
                    ) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The Fisher pass with, optionally, a second accumulator: this rank's chunk of sum g^2 (the Fisher scores)
    and, with `with_sum`, of sum g (same passes, same chunking and reduction), and the statistics."""
    t0 = time.perf_counter()
    model = engine.module
    was_training = model.training
    model.eval()  # dropout off: scores are a deterministic function of the examples
    dev = fdist.device()
    world, rank = fdist.world_size(), fdist.rank()
    params = [t.param for t in pool.tensors]
    bounds = [pool.chunk(r, world) for r in range(world)]
    chunks = [torch.zeros(e - s, dtype=torch.float32, device=dev) for s, e in bounds]  # the accumulator
    sums = [torch.zeros_like(c) for c in chunks] if with_sum else None  # sum of gradients (saliency, snr)
    segments = _segments(pool, bounds)
    acc_peak = sum(c.numel() for c in chunks) * 4 * (2 if with_sum else 1)
    grad_peak = 0
    zero3 = engine.optimizer.parameter_offload.get_param_coordinator() if engine.zero_optimization_stage() == 3 \
        else None
    groups = _passes(len(examples), granularity, micro_batch_size)
    for i, group in enumerate(groups):
        batch = collate([examples[j] for j in group] or [examples[0]])
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss = model(**batch).loss  # the module, not engine(): no DeepSpeed backward/reduction hooks
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        if zero3:  # autograd.grad skips the hooks that end a ZeRO-3 backward: release what it left gathered
            zero3.release_backward_leftovers()
        grad_peak = max(grad_peak, sum(g.numel() * g.element_size() for g in grads if g is not None))
        for n, parts in enumerate(segments):
            g, grads[n] = grads[n], None  # free each gradient once it is added
            if group and g is not None:
                g = g.detach().reshape(-1)
                for r, a, b, c, d in parts:
                    chunks[r][a:b].add_(g[c:d].to(torch.float32).square())
                    if sums is not None:
                        sums[r][a:b].add_(g[c:d].to(torch.float32))
        del grads, loss
        if progress is not None:
            progress(i + 1, len(groups))
    if zero3:
        engine.empty_partition_cache()
        zero3.reset_step()
    model.train(was_training)
    t_local = time.perf_counter() - t0

    start, end = bounds[rank]
    accumulators = [chunks] + ([sums] if sums is not None else [])
    if world > 1:
        for acc in accumulators:
            for r in range(world):
                for a in range(0, acc[r].numel(), REDUCE_PIECE):
                    dist.reduce(acc[r][a:a + REDUCE_PIECE], dst=r)
                if r != rank:
                    acc[r] = None  # not ours: free it as soon as it is reduced
    local = chunks[rank].to("cpu")
    local_sum = sums[rank].to("cpu") if sums is not None else None
    chunks.clear()
    held = local.numel()
    # one MAX all-reduce: a NaN/Inf anywhere stops every rank (not only the chunk's owner), plus memory maxima
    flag = torch.tensor([int(not bool(torch.isfinite(local).all())), acc_peak, grad_peak, held * 4, held],
                        dtype=torch.int64)
    fdist.all_reduce_(flag, op=dist.ReduceOp.MAX)
    check_finite(pool, local, start)
    if flag[0].item():
        raise FisherError("Fisher scores contain NaN or Inf on another rank (its error names the parameter); lower "
                          "train.lr for the warm-up, check the data, or use train.precision=fp32")
    stats = {"collect_seconds": time.perf_counter() - t0, "local_pass_seconds": t_local,
             "passes_per_rank": len(groups),
             # bytes and entries per rank, max over ranks
             "accumulator_peak_bytes": int(flag[1]), "grad_peak_bytes": int(flag[2]),
             "scores_held_bytes": int(flag[3]), "scores_held_entries": int(flag[4])}
    return (local,) + ((local_sum,) if local_sum is not None else ()), stats


def check_finite(pool: Pool, local: torch.Tensor, start: int) -> None:
    """Raise FisherError naming the first parameter whose scores in this rank's chunk are NaN or Inf.

    `local` holds the scores of global pool indices [start, start + local.numel()).
    """
    bad = ~torch.isfinite(local)
    if bool(bad.any()):
        t = pool.tensor_at(start + int(bad.nonzero()[0, 0]))
        raise FisherError(f"Fisher scores of {t.name} contain NaN or Inf; lower train.lr for the warm-up, check "
                          "the data for empty or broken examples, or use train.precision=fp32")


@torch.no_grad()
def gather_scores(pool: Pool, local: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """All scores on rank 0 (for fish.save_scores only: this is the gather the selection avoids)."""
    world = fdist.world_size()
    if world == 1:
        return pool.split(local)
    per = pool.chunk(0, world)[1]
    buf = torch.zeros(per, dtype=torch.float32, device=fdist.comm_device())
    buf[:local.numel()] = local.to(buf.device)
    parts = [torch.empty_like(buf) for _ in range(world)] if fdist.is_main() else None
    dist.gather(buf, parts, dst=0)
    if not fdist.is_main():
        return None
    parts = [p.cpu() for p in parts]
    full = torch.cat([parts[r][:e - s] for r, (s, e) in enumerate(pool.chunk(r, world) for r in range(world))])
    return pool.split(full)

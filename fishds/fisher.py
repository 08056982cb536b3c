"""Empirical Fisher scores of the pool, collected on sharded models without reducing gradients first.

F[j] = sum over the N scoring examples of (dL(x_i, y_i)/d theta_j)^2   (granularity "sample", the paper)
F[j] = sum over micro-batches b of (dL_b/d theta_j)^2                     (granularity "batch", cheaper)

The N examples are dealt round-robin to the ranks, so each counts exactly once. Each rank calls the wrapped module
(ZeRO-3 still gathers weights through its module hooks) and takes the local gradient of the pool parameters with torch.autograd.grad: it has full shape on every ZeRO stage
(ZeRO-3 gathers the weights for the forward and backward), is never reduced across ranks, and no
gradient of the frozen base weights is computed. Squares are summed into one flat fp32 accumulator
in pool order; at the end each chunk of it is reduced once to the rank that owns it (pool.chunk), so
after the pass a rank keeps only its share of the scores. Ranks with fewer examples run the same
number of forward/backward passes (weight 0) so that ZeRO-3's collectives stay matched.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.distributed as dist

from . import dist as fdist
from .pool import Pool


class FisherError(RuntimeError):
    pass


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
    t0 = time.perf_counter()
    model = engine.module
    was_training = model.training
    model.eval()  # dropout off: scores are a deterministic function of the examples
    dev = fdist.device()
    params = [t.param for t in pool.tensors]
    flat = torch.zeros(pool.size, dtype=torch.float32, device=dev)
    acc = [flat[t.offset:t.offset + t.numel].view(t.shape) for t in pool.tensors]
    zero3 = engine.optimizer.parameter_offload.get_param_coordinator() if engine.zero_optimization_stage() == 3 \
        else None
    groups = _passes(len(examples), granularity, micro_batch_size)
    for i, group in enumerate(groups):
        batch = collate([examples[j] for j in group] or [examples[0]])
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss = model(**batch).loss  # the module, not engine(): no DeepSpeed backward/reduction hooks
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if zero3:  # autograd.grad skips the hooks that end a ZeRO-3 backward: release what it left gathered
            zero3.release_backward_leftovers()
        if group:
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().to(torch.float32).square())
        if progress is not None:
            progress(i + 1, len(groups))
    if zero3:
        engine.empty_partition_cache()
        zero3.reset_step()
    model.train(was_training)
    t_local = time.perf_counter() - t0

    start, end = pool.chunk(fdist.rank(), fdist.world_size())
    if fdist.world_size() > 1:
        for r in range(fdist.world_size()):
            s, e = pool.chunk(r, fdist.world_size())
            if e > s:
                dist.reduce(flat[s:e], dst=r)
    local = flat[start:end].to("cpu").clone()
    del flat, acc
    flag = torch.tensor([float(not bool(torch.isfinite(local).all()))])
    fdist.all_reduce_(flag, op=dist.ReduceOp.MAX)  # every rank stops, not only the chunk's owner
    check_finite(pool, local, start)
    if flag.item():
        raise FisherError("Fisher scores contain NaN or Inf on another rank (its error names the parameter); lower "
                          "train.lr for the warm-up, check the data, or use train.precision=fp32")
    stats = {"collect_seconds": time.perf_counter() - t0, "local_pass_seconds": t_local,
             "passes_per_rank": len(groups)}
    return local, stats


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
    buf = torch.zeros(per, dtype=torch.float32)
    buf[:local.numel()] = local
    parts = [torch.empty_like(buf) for _ in range(world)] if fdist.is_main() else None
    dist.gather(buf, parts, dst=0)
    if not fdist.is_main():
        return None
    full = torch.cat([parts[r][:e - s] for r, (s, e) in enumerate(pool.chunk(r, world) for r in range(world))])
    return pool.split(full)

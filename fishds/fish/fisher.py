"""Empirical Fisher scores of the pool, collected on sharded models without reducing gradients first.

F[j] = sum over the N scoring examples of (dL(x_i, y_i)/d theta_j)^2   (granularity "sample", the paper)
F[j] = sum over micro-batches b of (dL_b/d theta_j)^2                     (granularity "batch", cheaper)

Granularity "sample" is computed batched by default (fish.per_example: batched): the per-example gradients of a
micro-batch come from one forward/backward through module hooks (fishds/fish/per_example.py), so the pass costs about
what "batch" costs; fish.per_example: loop runs one forward/backward per example (and scores the parameters no
batched rule covers in either mode). The text below describes the accumulator, common to all modes.

The N examples are dealt round-robin to the ranks, so each counts exactly once. Each rank calls the wrapped module
(ZeRO-3 still gathers weights through its module hooks) and takes the local gradient of the pool parameters
with torch.autograd.grad: it has full shape on every ZeRO stage
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
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import dist as fdist
from .. import zero
from ..run.loss import example_losses, forward_kwargs, mean_loss
from .per_example import CHECK_RTOL, BatchedFisher, per_example_losses
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
    groups = [mine[i : i + size] for i in range(0, len(mine), size)]
    per_rank = -(-n // fdist.world_size())
    total = math.ceil(per_rank / size)
    while len(groups) < total:
        groups.append([])  # dummy pass, contributes nothing
    return groups


def collect_scores(
    engine,
    pool: Pool,
    examples: list[dict],
    granularity: str,
    micro_batch_size: int,
    collate: Callable[[list[dict]], dict],
    progress=None,
    per_example: str = "batched",
) -> tuple[torch.Tensor, dict]:
    """Run the Fisher pass; return this rank's chunk of the scores (fp32) and timing statistics."""
    (scores,), stats = collect_moments(
        engine, pool, examples, granularity, micro_batch_size, collate, progress, per_example=per_example
    )
    return scores, stats


@dataclass
class Moments:
    """The Fisher pass's accumulators and statistics on one rank: every owner chunk (pool.chunk) of sum g^2 and,
    with_sum, of sum g (fp32, on the device), the pass counts and the memory peaks seen."""

    segments: list  # per pool tensor: (owner rank, chunk start, chunk end, tensor start, tensor end)
    chunks: list  # per owner rank: its chunk of sum g^2 (None once reduced away)
    sums: list | None  # the same for sum g (saliency, snr), or None
    progress: Callable | None = None
    done: int = 0
    total: int = 0  # passes planned (the progress bar's total)
    grad_peak: int = 0  # bytes of one pass's pool gradients (or batched squares)
    output_grad_peak: int = 0  # bytes of the captured layer-output gradients of one batched pass

    @classmethod
    def for_pool(cls, pool: Pool, with_sum: bool, progress: Callable | None = None) -> "Moments":
        world = fdist.world_size()
        bounds = [pool.chunk(r, world) for r in range(world)]
        chunks = [torch.zeros(e - s, dtype=torch.float32, device=fdist.device()) for s, e in bounds]
        sums = [torch.zeros_like(c) for c in chunks] if with_sum else None
        return cls(_segments(pool, bounds), chunks, sums, progress)

    @property
    def accumulator_bytes(self) -> int:
        return sum(c.numel() for c in self.chunks) * 4 * (2 if self.sums is not None else 1)

    def add(self, n: int, sq: torch.Tensor, g: torch.Tensor | None = None) -> None:
        """Add the flat squares `sq` (and, with sums, the flat summed gradients `g`) of pool tensor n."""
        for r, a, b, c, d in self.segments[n]:
            self.chunks[r][a:b].add_(sq[c:d])
            if self.sums is not None:
                self.sums[r][a:b].add_(g[c:d])

    def saw(self, grads, output: bool = False) -> None:
        """Record the bytes of one pass's gradients (output: the captured layer-output gradients)."""
        n = sum(g.numel() * g.element_size() for g in grads if g is not None)
        if output:
            self.output_grad_peak = max(self.output_grad_peak, n)
        else:
            self.grad_peak = max(self.grad_peak, n)

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def reduce_to_owners(self) -> tuple[torch.Tensor, ...]:
        """Each chunk reduced once to the rank that owns it (pieces of REDUCE_PIECE entries), the others freed as
        soon as they are reduced; returns this rank's chunks on the CPU: (sum g^2,) or (sum g^2, sum g)."""
        world, rank = fdist.world_size(), fdist.rank()
        accs = [self.chunks] + ([self.sums] if self.sums is not None else [])
        if world > 1:
            for acc in accs:
                for r in range(world):
                    for a in range(0, acc[r].numel(), REDUCE_PIECE):
                        dist.reduce(acc[r][a : a + REDUCE_PIECE], dst=r)
                    if r != rank:
                        acc[r] = None  # not ours: free it as soon as it is reduced
        local = tuple(acc[rank].to("cpu") for acc in accs)
        for acc in accs:
            acc.clear()
        return local


def collect_moments(
    engine,
    pool: Pool,
    examples: list[dict],
    granularity: str,
    micro_batch_size: int,
    collate: Callable[[list[dict]], dict],
    progress=None,
    per_example: str = "batched",
    with_sum: bool = False,
) -> tuple[tuple[torch.Tensor, ...], dict]:
    """The Fisher pass: this rank's chunk of sum g^2 (the Fisher scores) and, with `with_sum`, of sum g (a second
    accumulator over the same passes, chunked and reduced the same way; saliency and snr), and the statistics.

    granularity "sample" with per_example "batched" (the default) takes the per-example squared gradients of a
    whole micro-batch from one forward/backward (fishds/fish/per_example.py); "loop" runs one pass per example. Both
    give the same scores (fp32: to rounding); parameters no batched rule covers are looped in either case.
    """
    if per_example not in ("batched", "loop"):
        raise ValueError(f"fish.per_example={per_example!r} must be batched or loop")
    t0 = time.perf_counter()
    model = engine.module
    was_training = model.training
    model.eval()  # dropout off: scores are a deterministic function of the examples
    run = _PassInputs(model, zero.zero3_coordinator(engine), [t.param for t in pool.tensors], examples, collate)
    m = Moments.for_pool(pool, with_sum, progress)
    acc_peak = m.accumulator_bytes
    batched = granularity == "sample" and per_example == "batched"
    loop_params = list(range(len(run.params)))
    batched_passes = 0
    if batched:
        groups = _passes(len(examples), "batch", micro_batch_size)
        m.total = batched_passes = len(groups)
        loop_params = _batched_pass(run, groups, m)
        if loop_params:
            fdist.print0(
                f"[fishds] per-example Fisher: no batched rule for {len(loop_params)} of {len(run.params)} "
                "pool tensors, scored one example at a time: " + ", ".join(pool.tensors[n].name for n in loop_params)
            )
    if loop_params:
        groups = _passes(len(examples), granularity, micro_batch_size)
        m.total += len(groups)
        _loop_pass(run, loop_params, groups, m)
    zero.end_gradient_pass(engine, run.zero3)
    model.train(was_training)
    t_local = time.perf_counter() - t0
    moments = m.reduce_to_owners()
    local = moments[0]
    held = local.numel()
    # one MAX all-reduce: a NaN/Inf anywhere stops every rank (not only the chunk's owner), plus memory maxima
    flag = torch.tensor(
        [int(not bool(torch.isfinite(local).all())), acc_peak, m.grad_peak, held * 4, held, m.output_grad_peak],
        dtype=torch.int64,
    )
    fdist.all_reduce_(flag, op=dist.ReduceOp.MAX)
    check_finite(pool, local, pool.chunk(fdist.rank(), fdist.world_size())[0])
    if flag[0].item():
        raise FisherError(
            "Fisher scores contain NaN or Inf on another rank (its error names the parameter); lower "
            "train.lr for the warm-up, check the data, or use train.precision=fp32"
        )
    stats = {
        "collect_seconds": time.perf_counter() - t0,
        "local_pass_seconds": t_local,
        "passes_per_rank": m.done,
        "per_example": per_example if granularity == "sample" else None,
        "batched_passes_per_rank": batched_passes,
        "looped_tensors": len(loop_params) if batched else 0,
        # bytes and entries per rank, max over ranks
        "accumulator_peak_bytes": int(flag[1]),
        "grad_peak_bytes": int(flag[2]),
        "scores_held_bytes": int(flag[3]),
        "scores_held_entries": int(flag[4]),
        "output_grad_peak_bytes": int(flag[5]),  # batched: the captured layer-output gradients of one pass
    }
    return moments, stats


@dataclass(frozen=True)
class _PassInputs:
    model: torch.nn.Module  # the module, not engine(): no DeepSpeed backward/reduction hooks
    zero3: object  # zero.zero3_coordinator(engine)
    params: list  # the pool parameters, in pool order
    examples: list
    collate: Callable

    def batch(self, group: list[int]) -> dict:
        """The collated examples of a group, on the device (a weight-0 pass on example 0 for an empty group)."""
        return {
            k: v.to(fdist.device())
            for k, v in self.collate([self.examples[j] for j in group] or [self.examples[0]]).items()
        }


def _loop_pass(run: _PassInputs, indices: list[int], groups, m: Moments) -> None:
    """One forward/backward per group; squares of the gradients of the pool tensors `indices` added."""
    params = [run.params[n] for n in indices]
    for group in groups:
        loss = mean_loss(run.model, run.batch(group))  # the training loss path (fishds/run/loss.py)
        grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        zero.release_backward_leftovers(run.zero3)  # autograd.grad skips the hooks that end a ZeRO-3 backward
        m.saw(grads)
        for j, n in enumerate(indices):
            g, grads[j] = grads[j], None  # free each gradient once it is added
            if group and g is not None:
                g = g.detach().reshape(-1).to(torch.float32)
                m.add(n, g.square(), g)
        del grads, loss
        m.tick()


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = float(want.abs().max()) if want.numel() else 0.0
    diff = (got.float().reshape(-1) - want.float().reshape(-1)).abs().max() if got.numel() else 0.0
    return bool(diff <= CHECK_RTOL * scale + 1e-30)


def _batched_pass(run: _PassInputs, groups, m: Moments) -> list[int]:
    """Per-example squares of the covered pool tensors, one forward/backward per micro-batch; returns the pool
    indices left for the loop (not covered by a rule, failing the first-batch check, or all of them when the
    model's loss cannot be split per example)."""
    model, params, with_sum = run.model, run.params, m.sums is not None
    bf = BatchedFisher(model, params)
    if not bf.rules:
        return list(range(len(params)))
    accepted = {i for r in bf.rules for i in r.params}
    with bf:
        for gi, group in enumerate(groups):
            batch = run.batch(group)
            b = batch["input_ids"].shape[0] if "input_ids" in batch else next(iter(batch.values())).shape[0]
            labels = batch.get("labels")
            causal = torch.is_tensor(labels) and labels.dim() == 2 and "input_ids" in batch
            if causal:  # the training loss path (fishds/run/loss.py): per-example sums of its chunked cross-entropy
                out = bf.forward({k: v for k, v in batch.items() if k != "labels"}, **forward_kwargs(model))
                split = example_losses(model, out, labels)
            else:
                out = bf.forward(batch)
                logits = getattr(out, "logits", None)
                split = (
                    per_example_losses(logits, labels) if torch.is_tensor(logits) and torch.is_tensor(labels) else None
                )
            loss = split[0].sum() if split is not None else out.loss
            targets, spans = bf.targets()
            checked = sorted(accepted) if gi == 0 else []
            grads = list(torch.autograd.grad(loss, targets + [params[i] for i in checked], allow_unused=True))
            zero.release_backward_leftovers(run.zero3)
            m.saw(grads[len(targets) :])
            m.saw(grads[: len(targets)], output=True)
            if gi == 0:  # the same decision on every rank: one MIN all-reduce of the flags
                sums = bf.summed(grads[: len(targets)], spans, b)
                # causal LM: the loss is fishds' own (the training loss path), nothing of the model's to check against
                flags = [int(split is not None and (causal or _close(split[1], out.loss.detach())))]
                flags += [
                    int(g is None or (i in sums and _close(sums[i], g))) for i, g in zip(checked, grads[len(targets) :])
                ]
                flag = fdist.all_reduce_(torch.tensor(flags, dtype=torch.int64), op=dist.ReduceOp.MIN)
                if not flag[0]:
                    fdist.print0(
                        "[fishds] per-example Fisher: the model's loss is not one fishds can split per "
                        "example (causal LM or sequence classification); scoring one example at a time"
                    )
                    return list(range(len(params)))
                accepted -= {i for i, ok in zip(checked, flag[1:].tolist()) if not ok}
                del grads[len(targets) :]
            squares = bf.squares(grads, spans, b)  # pool-shaped fp32, like one pass's gradients in the loop
            summed = bf.summed(grads, spans, b) if with_sum else {}  # sum g over the batch's examples
            m.grad_peak = max(m.grad_peak, sum(sq.numel() * 4 for sq in squares.values()))
            if group:
                for i, sq in squares.items():
                    if i in accepted:
                        m.add(i, sq.reshape(-1), summed[i].reshape(-1).float() if with_sum else None)
            del squares, summed
            del grads, loss, out
            bf.clear()
            m.tick()
    return [i for i in range(len(params)) if i not in accepted]


def check_finite(pool: Pool, local: torch.Tensor, start: int) -> None:
    """Raise FisherError naming the first parameter whose scores in this rank's chunk are NaN or Inf.

    `local` holds the scores of global pool indices [start, start + local.numel()).
    """
    bad = ~torch.isfinite(local)
    if bool(bad.any()):
        t = pool.tensor_at(start + int(bad.nonzero()[0, 0]))
        raise FisherError(
            f"Fisher scores of {t.name} contain NaN or Inf; lower train.lr for the warm-up, check "
            "the data for empty or broken examples, or use train.precision=fp32"
        )


@torch.no_grad()
def gather_scores(pool: Pool, local: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """All scores on rank 0 (for fish.save_scores only: this is the gather the selection avoids)."""
    world = fdist.world_size()
    if world == 1:
        return pool.split(local)
    per = pool.chunk(0, world)[1]
    buf = torch.zeros(per, dtype=torch.float32, device=fdist.comm_device())
    buf[: local.numel()] = local.to(buf.device)
    parts = [torch.empty_like(buf) for _ in range(world)] if fdist.is_main() else None
    dist.gather(buf, parts, dst=0)
    if not fdist.is_main():
        return None
    parts = [p.cpu() for p in parts]
    full = torch.cat([parts[r][: e - s] for r, (s, e) in enumerate(pool.chunk(r, world) for r in range(world))])
    return pool.split(full)

"""Score rules (`fish.score`): how this rank's chunk of the pool (pool.chunk) is ranked. A table, name -> Score.

Every score ends as this rank's contiguous chunk of the pool, so the selection stays distributed (no rank holds
every score). Where a score needs full tensors (theta, AdamW's moments) they are fetched one pool tensor at a
time on every rank (a collective under ZeRO), and only the slice that falls into the chunk is kept.

| score | value per entry j | needs |
|---|---|---|
| fisher | F[j] = sum_i g_ij^2 (per-example gradients, the paper; `fish.granularity`) | the scoring pass |
| lowest | the k lowest F[j] (the paper's ablation) | the scoring pass |
| saliency | abs(theta_j * sum_i g_ij) (SNIP / Taylor; LoRA's A -> cA, B -> B/c leave it) | pass + 1 accumulator |
| snr | abs(sum_i g_ij) / sqrt(sum_i g_ij^2 + SNR_EPS) (gradient signal/noise, <= sqrt(N)) | pass + 1 accumulator |
| grad | abs(sum_i g_ij); a LoRA rank component: the norm of its lora_B column's sum g | pass + 1 accumulator |
| adam_v | AdamW's exp_avg_sq after the dense warm-up (a free Fisher of the reduced gradients) | warm-up, no pass |
| movement | abs(theta_j - theta_j at the warm-up's start) | warm-up, no pass |
| random | a seeded hash of the global index (same mask for any world size) | nothing |

theta is the adapter when the mask is fixed (after any warm-up). Scores of the scoring pass are taken in eval mode
(dropout off) on the fish.num_samples examples; adam_v and movement cost no forward or backward beyond the warm-up.

grad at LoRA's initialisation (B = 0): lora_B's gradient column j is s x G A_j^T summed over the examples (G the
full-weight gradient), so the norm of that column, the rank component's grad score (fish.allocation=rank), says how
well the random direction A_j aligns with G: a Fisher-informed choice of directions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .. import dist as fdist
from .. import zero
from .fisher import FisherError, check_finite, collect_moments
from .pool import Pool, PoolTensor
from .select import float_keys, random_keys

SNR_EPS = 1e-20  # keeps 0 / 0 at 0 (an entry whose every scoring gradient is 0, e.g. lora_A at init)


@dataclass
class ScoreContext:
    """What a score may read: the `fish:` section (fishds/fish/config.FishSection), the micro-batch size of the
    scoring pass, the engine and pool, this rank's chunk, the scoring examples, the adapter at the warm-up's start
    (or None), and `info` (the selection report, filled as it goes)."""

    fish: object
    micro_batch_size: int
    engine: object
    pool: Pool
    start: int
    end: int
    examples: list
    collate: Callable
    initial: dict | None = None
    progress: Callable | None = None
    info: dict = field(default_factory=dict)
    values: torch.Tensor | None = None  # this rank's chunk of the score values, once computed (not for random)


@dataclass(frozen=True, kw_only=True)
class Score:
    """One `fish.score`: its doc (the config reference's line, fishds/fish/config.py) and what it needs, from
    which FishSection and fishds/fish/config.check_run derive their checks."""

    name: str
    doc: str  # what ranks the entries, one line
    compute: Callable[[ScoreContext], torch.Tensor]  # this rank's chunk: fp32 values (>= 0), or int64 keys (random)
    needs_pass: bool = False  # a forward/backward pass over fish.num_samples scoring examples
    needs_warmup: bool = False  # values from training: state of the dense steps (fish.dense_steps > 0)
    needs_adam: bool = False  # AdamW's state (train.optimizer=adamw or an Adam optimizer in the DeepSpeed JSON)
    lowest: bool = False  # the k lowest values instead of the k highest
    is_random: bool = False  # compute returns keys, not values
    component_power: int = 1  # a group of entries (a LoRA rank component) scores sum(value ** this): 2 for a norm

    def keys(self, values: torch.Tensor) -> torch.Tensor:
        """Integer keys whose descending order is the selection order (exact_topk_grouped takes the largest)."""
        if self.is_random:
            return values
        keys = float_keys(values)
        return -keys - 1 if self.lowest else keys


def _moments(ctx: ScoreContext, with_sum: bool) -> tuple[torch.Tensor, ...]:
    f = ctx.fish
    moments, stats = collect_moments(
        ctx.engine,
        ctx.pool,
        ctx.examples,
        f.granularity,
        ctx.micro_batch_size,
        ctx.collate,
        progress=ctx.progress,
        per_example=f.per_example,
        with_sum=with_sum,
    )
    ctx.info.update(stats, num_samples=len(ctx.examples), granularity=f.granularity)
    return moments


def chunk_of(pool: Pool, start: int, end: int, fetch: Callable[[PoolTensor], torch.Tensor]) -> torch.Tensor:
    """This rank's chunk [start, end) of a pool-wide quantity, from fetch(t) = tensor t's full values (any shape).

    fetch is called for every pool tensor on every rank, in pool order (it may be a collective: ZeRO gathers);
    each full tensor is dropped once its slice is copied, so at most one full tensor is held at a time.
    """
    out = torch.zeros(end - start, dtype=torch.float32)
    for t in pool.tensors:
        full = fetch(t)
        a, b = max(start, t.offset), min(end, t.offset + t.numel)
        if a < b:
            out[a - start : b - start] = full.reshape(-1)[a - t.offset : b - t.offset].to("cpu", torch.float32)
        del full
    return out


@torch.no_grad()
def theta(t: PoolTensor) -> torch.Tensor:
    """Full values of one pool tensor on every rank (gathers it under ZeRO-3, a no-op otherwise)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([t.param], modifier_rank=None):
        return t.param.detach().reshape(-1)[: t.numel].to("cpu", torch.float32, copy=True)


def adam_state(engine, t: PoolTensor, key: str = "exp_avg_sq") -> torch.Tensor:
    """Full fp32 AdamW state `key` of one pool tensor on every rank (a collective under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    value = safe_get_full_optimizer_state(t.param, key)  # ZeRO 1-3 and DeepSpeed's bf16 optimizer
    if value is None:  # stage 0: the torch optimizer's own state, keyed by the parameter or its fp32 copy
        value = zero.stage0_optimizer_state(engine, t.param, key)
    if value is None:
        raise FisherError(
            f"fish.score=adam_v: no AdamW {key} for {t.name}; it needs train.optimizer=adamw (or an "
            "Adam optimizer in the DeepSpeed JSON) and fish.dense_steps > 0"
        )
    return value.reshape(-1)[: t.numel]


def _fisher(ctx: ScoreContext) -> torch.Tensor:
    return _moments(ctx, with_sum=False)[0]


def _saliency(ctx: ScoreContext) -> torch.Tensor:
    _, g = _moments(ctx, with_sum=True)
    return (chunk_of(ctx.pool, ctx.start, ctx.end, theta) * g).abs_()


def _snr(ctx: ScoreContext) -> torch.Tensor:
    sq, g = _moments(ctx, with_sum=True)
    return g.abs_().div_(sq.add_(SNR_EPS).sqrt_())


def _grad(ctx: ScoreContext) -> torch.Tensor:
    return _moments(ctx, with_sum=True)[1].abs_()


def _adam_v(ctx: ScoreContext) -> torch.Tensor:
    return chunk_of(ctx.pool, ctx.start, ctx.end, lambda t: adam_state(ctx.engine, t)).abs_()


def _movement(ctx: ScoreContext) -> torch.Tensor:
    if ctx.initial is None:
        raise FisherError("fish.score=movement needs the adapter at the warm-up's start (fish.dense_steps > 0)")
    now = chunk_of(ctx.pool, ctx.start, ctx.end, theta)
    return now.sub_(chunk_of(ctx.pool, ctx.start, ctx.end, lambda t: ctx.initial[t.name])).abs_()


def _random(ctx: ScoreContext) -> torch.Tensor:
    ctx.info["collect_seconds"] = 0.0
    return random_keys(ctx.start, ctx.end, ctx.fish.seed)


SCORES: dict[str, Score] = {
    s.name: s
    for s in (
        Score(name="fisher", doc="sum of squared per-example gradients, the paper", compute=_fisher, needs_pass=True),
        Score(name="lowest", doc="the k lowest Fisher scores", compute=_fisher, needs_pass=True, lowest=True),
        Score(name="saliency", doc="|theta * sum g|", compute=_saliency, needs_pass=True),
        Score(name="snr", doc="|sum g| / sqrt(sum g^2 + eps)", compute=_snr, needs_pass=True),
        Score(
            name="grad",
            doc="|sum g|, the summed gradient (a rank component: the norm of its lora_B column's, which at LoRA's "
            "initialisation measures how well its lora_A direction aligns with the full-weight gradient)",
            compute=_grad,
            needs_pass=True,
            component_power=2,
        ),
        Score(
            name="adam_v",
            doc="AdamW's exp_avg_sq after the dense warm-up",
            compute=_adam_v,
            needs_warmup=True,
            needs_adam=True,
        ),
        Score(name="movement", doc="|theta - theta at the warm-up's start|", compute=_movement, needs_warmup=True),
        Score(name="random", doc="a seeded hash of the entry's index", compute=_random, is_random=True),
    )
}


def local_scores(score: Score, ctx: ScoreContext) -> torch.Tensor:
    """This rank's chunk of `score` (values, or keys for random); NaN/Inf stop every rank naming the tensor."""
    values = score.compute(ctx)
    if score.is_random:
        return values
    bad = torch.tensor([int(not bool(torch.isfinite(values).all()))], dtype=torch.int64)
    fdist.all_reduce_(bad, op=torch.distributed.ReduceOp.MAX)
    check_finite(ctx.pool, values, ctx.start)
    if bad.item():
        raise FisherError(f"fish.score={score.name}: scores contain NaN or Inf on another rank")
    return values

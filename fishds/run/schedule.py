"""The run's length and LR schedule: train.max_steps or train.epochs, LR warm-up, transformers' schedulers.

The run has `total_steps` optimizer steps: train.max_steps when set, else ceil(train.epochs x optimizer steps per
epoch), else 100. fish.head_steps (head-only steps) and then fish.dense_steps (the dense steps before scoring) are
the first of them. The LR schedule spans
all of them and is transformers.get_scheduler's (the names TrainingArguments.lr_scheduler_type takes), its warm-up
train.lr_warmup_steps or ceil(train.lr_warmup_ratio x total_steps).
"""

from __future__ import annotations

import math

import torch

from ..config import Config, ConfigError

DEFAULT_STEPS = 100


def micro_batches_per_epoch(n_blocks: int, micro_batch_size: int, world: int) -> int:
    """Micro-batches per rank per epoch, as ShardedBatches deals them (the remainder of a global batch is dropped)."""
    return max(1, n_blocks // (micro_batch_size * world))


def total_steps(cfg: Config, n_blocks: int, world: int) -> int:
    """Optimizer steps of the whole run, head and dense steps included; raises ConfigError when they leave no
    masked step (no step that trains the adapter, for a run without a mask)."""
    t = cfg.train
    if t.max_steps is not None:
        steps = t.max_steps
    elif t.epochs is not None:
        per_epoch = micro_batches_per_epoch(n_blocks, t.micro_batch_size, world) / t.grad_accum
        steps = max(1, math.ceil(t.epochs * per_epoch - 1e-9))
    else:
        steps = DEFAULT_STEPS
    # fish.dense_steps unset: resolved here, once, for this run's length (the rest of the run reads an int)
    cfg.fish = cfg.fish.resolved(steps)
    f = cfg.fish
    masked = not f.dense and not f.mask_path  # dense steps apply only before a selection
    first = {"head_steps": f.head_steps, "dense_steps": f.dense_steps if masked else 0}
    named = {f"fish.{key}": n for key, n in first.items() if n}
    if named and sum(named.values()) >= steps:
        what = (
            f"train.max_steps={t.max_steps}"
            if t.max_steps is not None
            else (
                f"train.epochs={t.epochs:g} ({steps} steps of {n_blocks} training blocks)"
                if t.epochs is not None
                else f"the default {DEFAULT_STEPS} steps"
            )
        )
        raise ConfigError(
            f"{' + '.join(f'{key}={n}' for key, n in named.items())} leaves no "
            f"{'masked step' if masked else 'step that trains the adapter'}: {what} counts these steps too; raise "
            f"train.max_steps / train.epochs or lower {' / '.join(named)}"
        )
    return steps


def epoch_of(position: int, n_blocks: int, micro_batch_size: int, world: int) -> float:
    """The epoch (a float: 1.5 = half-way through the second pass) after `position` micro-batches per rank."""
    return position / micro_batches_per_epoch(n_blocks, micro_batch_size, world)


def warmup_steps(cfg: Config, steps: int) -> int:
    t = cfg.train
    return t.lr_warmup_steps or math.ceil(t.lr_warmup_ratio * steps)


def scheduler(cfg: Config, steps: int):
    """The lr_scheduler argument of deepspeed.initialize: optimizer -> transformers scheduler."""
    from transformers import get_scheduler

    t = cfg.train
    return lambda opt: get_scheduler(
        t.scheduler,
        opt,
        num_warmup_steps=warmup_steps(cfg, steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=dict(t.scheduler_kwargs),
    )


def check(cfg: Config) -> None:
    """Build the schedule once on a throw-away optimizer (no weights): a bad train.scheduler_kwargs is named here."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    steps = cfg.train.max_steps or DEFAULT_STEPS
    try:
        scheduler(cfg, steps)(opt)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"train.scheduler={cfg.train.scheduler!r} with train.scheduler_kwargs={cfg.train.scheduler_kwargs}: {e}"
        ) from None

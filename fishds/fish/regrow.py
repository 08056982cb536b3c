"""Mask regrowth (`fish.regrow_every`): RigL-style drop and grow inside the adapter, one pool tensor at a time.

Every `regrow_every` masked steps (counted from the first masked step), while the step is at most
`regrow_until` x the run's steps (and not the last step), each pool tensor with d = round(regrow_fraction x its
selected count) > 0 (at most its unselected count):
- drops the d selected entries that moved least since they were grown, |theta_now - theta_at_growth| (the initial
  mask counts as grown when it was fixed);
- grows the d previously unselected entries with the largest |sum g|, g the full local gradient of every
  micro-batch of the interval (read by the enforcer's gradient hook before it zeroes the masked entries), summed
  over ranks once at regrowth time (fish.regrow_random: the same drops, growth by a seeded hash of the global index
  and the step instead).
An entry cannot be dropped and grown in one event (drops among the selected, growth among the unselected before the
drop), so each tensor keeps its selected count exactly. Both choices are exact_topk_grouped calls with one group
per pool tensor (plus one quota-0 group for the entries not in play) over integer keys: ties go to the lowest global
index and the mask is the same bit for bit on any number of ranks, given the same keys (fp32: the gradient sums are
reduced in another order on another number of ranks, so a near-tie can differ in the last bit).

What follows the mask (fishds/fish/enforce.py MaskEnforcer.set_masks): the gradient hooks read the new bits; the
restore set is rebuilt from the current fp32 masters, so a dropped entry stays frozen at its current value and a
grown entry starts from its current (frozen) value: lora_B entries 0, lora_A entries their initial value unless a
dense warm-up kept them (fish.reset_unselected=false), so the function does not jump; the optimizer's per-entry
state (Adam's moments, SGD's momentum) of every dropped and grown entry is zeroed.

Memory per rank: the gradient sums, one fp32 per entry of every pool tensor that holds an unselected entry (the
pool: 160 MB at 7B with LoRA r=16, a pool of about 40 M), and the values at growth of this rank's chunk of the pool
(160 MB / ranks). At regrowth, transient: this rank's chunk of gathered values, gradient sums, int64 keys and group
ids and the radix select's bins (about 70 B per chunk entry: 2.8 GB on 1 rank at 7B, 350 MB on 8). Traffic per
regrowth: the gradient sums reduced to the chunk owners (pool x 4 B), the adapter gathered one tensor at a time
(ZeRO-3; below ZeRO-3 every rank holds it), two radix selects and the new bits (pool / 8 B).
A checkpoint holds each rank's sums and values at growth (regrow-rank<R>.safetensors) and the history, so a resume
on the same number of ranks is bit-exact across a regrowth; another number of ranks is refused.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist

from .. import dist as fdist
from ..files import REGROW_RANK_FILE
from ..schema import ConfigError
from .allocation import selected_per_tensor, tensor_groups
from .keys import kind_of
from .mask import PackedMasks, share_selection
from .pool import Pool
from .scores import chunk_of, theta
from .select import _hash32, exact_topk_grouped, float_keys, random_keys


def check_config(cfg) -> None:
    """Refuse what regrowth cannot follow, before any weights load (cfg: config.Config)."""
    f = cfg.fish
    if f.regrow_every and cfg.train.save_best:
        raise ConfigError(
            f"fish.regrow_every={f.regrow_every} with train.save_best=true: the best checkpoint's mask is not the "
            "final one; set train.save_best=false (every checkpoint holds its adapter and mask) or fish.regrow_every=0"
        )


def regrow_counts(selected: list[int], sizes: list[int], fraction: float) -> list[int]:
    """d per tensor: round(fraction x selected), halves up, at most the tensor's unselected count."""
    frac = Fraction(fraction)
    return [min(math.floor(frac * s + Fraction(1, 2)), n - s) for s, n in zip(selected, sizes)]


def drop_grow(
    pool: Pool,
    start: int,
    end: int,
    active: torch.Tensor,
    movement: torch.Tensor,
    grad_sum: torch.Tensor | None,
    counts: list[int],
    grow_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The drops and the growth of this rank's chunk [start, end) of the pool (every rank calls it).

    active: the chunk's selected entries; movement: |theta - theta at growth| (fp32, read on active entries);
    grad_sum: sum g (fp32, read on inactive entries; its magnitude ranks the growth) or grow_keys (integer keys,
    largest grown first); counts: d per pool tensor. Returns (dropped, grown) booleans over the chunk."""
    n_t = len(pool.tensors)
    gid = tensor_groups(pool, start, end)
    active = active.reshape(-1).bool()
    quotas = list(counts) + [0]
    out = n_t  # the group of the entries not in play (quota 0)
    drop_keys = -float_keys(movement.reshape(-1)).to(torch.int64)  # least movement = largest key
    dropped, _ = exact_topk_grouped(drop_keys, torch.where(active, gid, out), quotas)
    if grow_keys is None:
        g = torch.nan_to_num(grad_sum.reshape(-1).to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
        grow_keys = float_keys(g.abs())
    grown, _ = exact_topk_grouped(grow_keys.reshape(-1), torch.where(active, out, gid), quotas)
    return dropped & active, grown & ~active


def _chunk_of(pool: Pool, start: int, end: int, per_tensor) -> torch.Tensor:
    """Concatenate per_tensor(t, lo, hi) (flat indices [lo, hi) of tensor t) over the chunk [start, end)."""
    parts = []
    for t in pool.tensors:
        lo, hi = max(start, t.offset), min(end, t.offset + t.numel)
        if lo < hi:
            parts.append(per_tensor(t, lo - t.offset, hi - t.offset))
    return torch.cat(parts) if parts else torch.zeros(0)


class Regrowth:
    """Regrowth of a run's mask: the gradient sums (filled by the enforcer's hooks), the values at growth, the
    schedule, the events and their history. Every rank builds one after the mask is enforced."""

    def __init__(self, fish, engine, pool: Pool, trainable: Pool, enforcer, first_step: int, total_steps: int):
        self.fish, self.engine, self.pool, self.trainable, self.enforcer = fish, engine, pool, trainable, enforcer
        self.every, self.first_step, self.total_steps = fish.regrow_every, first_step, total_steps
        self.last_step = min(total_steps - 1, math.floor(Fraction(fish.regrow_until) * total_steps))
        self.start, self.end = pool.chunk(fdist.rank(), fdist.world_size())
        masks = enforcer.masks
        self.sums = {  # the tensors that can change: those holding an unselected entry
            t.name: torch.zeros(t.numel, dtype=torch.float32, device=fdist.device())
            for t in pool.tensors
            if bool(masks.frozen(t.name).any())
        }
        enforcer.accumulators = self.sums
        self.grown_at = chunk_of(pool, self.start, self.end, theta)  # the initial mask: grown when it was fixed
        self.history: list[dict] = []

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * 4 for s in self.sums.values()) + self.grown_at.numel() * 4

    def due(self, step: int) -> bool:
        """Whether a regrowth follows the optimizer step `step`."""
        return self.every > 0 and step <= self.last_step and (step - self.first_step + 1) % self.every == 0

    def _owned_sums(self) -> torch.Tensor:
        """The gradient sums reduced to the chunk owners; this rank's chunk (fp32, CPU). Zeroes every sum."""
        world = fdist.world_size()
        if world > 1:
            dev = fdist.comm_device()
            for t in self.pool.tensors:
                acc = self.sums.get(t.name)
                if acc is None:
                    continue
                for r in range(world):
                    s, e = self.pool.chunk(r, world)
                    lo, hi = max(s, t.offset), min(e, t.offset + t.numel)
                    if lo < hi:
                        piece = acc[lo - t.offset : hi - t.offset]
                        buf = piece if piece.device == dev else piece.to(dev)
                        dist.reduce(buf, dst=r)
                        if buf is not piece and r == fdist.rank():
                            piece.copy_(buf)

        def read(t, lo, hi):
            acc = self.sums.get(t.name)
            return torch.zeros(hi - lo) if acc is None else acc[lo:hi].to("cpu", torch.float32, copy=True)

        local = _chunk_of(self.pool, self.start, self.end, read)
        for acc in self.sums.values():
            acc.zero_()
        return local

    @torch.no_grad()
    def regrow(self, step: int) -> tuple[PackedMasks, dict]:
        """One drop-and-grow event after the optimizer step `step` (every rank): the new masks (packed, every
        trainable tensor), enforced; returns them and the history entry."""
        pool, start, end, masks = self.pool, self.start, self.end, self.enforcer.masks
        grad_sum = self._owned_sums()
        now = chunk_of(pool, start, end, theta)
        active = _chunk_of(pool, start, end, lambda t, lo, hi: ~masks.frozen(t.name, lo, hi - lo).cpu())
        selected = [int((~masks.frozen(t.name)).sum()) for t in pool.tensors]
        counts = regrow_counts(selected, [t.numel for t in pool.tensors], self.fish.regrow_fraction)
        keys = None
        if self.fish.regrow_random:
            keys = random_keys(start, end, int(_hash32(torch.tensor(self.fish.seed + 0x5BD1E995 * step))))
        dropped, grown = drop_grow(pool, start, end, active, (now - self.grown_at).abs(), grad_sum, counts, keys)
        new = share_selection(pool, (active & ~dropped) | grown)
        self.grown_at = torch.where(grown, now, self.grown_at)
        per_drop = selected_per_tensor(pool, start, end, dropped)
        per_grow = selected_per_tensor(pool, start, end, grown)
        event = {"step": step, "dropped": {}, "grown": {}}
        for t, nd, ng in zip(pool.tensors, per_drop, per_grow):
            kind = kind_of(t.name)
            event["dropped"][kind] = event["dropped"].get(kind, 0) + nd
            event["grown"][kind] = event["grown"].get(kind, 0) + ng
        masks = PackedMasks.of(new.completed([(t.name, t.shape) for t in self.trainable.tensors]), fdist.device())
        self.enforcer.set_masks(masks)
        self.history.append(event)
        fdist.print0(
            f"[fishds] regrowth after step {step}: dropped {sum(per_drop):,}, grown {sum(per_grow):,} "
            f"({', '.join(f'{k} {v:,}' for k, v in event['grown'].items())} grown)"
        )
        return masks, event

    def report(self) -> dict:
        f = self.fish
        return {
            "every": f.regrow_every,
            "fraction": f.regrow_fraction,
            "until_step": self.last_step,
            "random": f.regrow_random,
            "state_bytes_rank0": self.nbytes,  # gradient sums + values at growth held by rank 0
            "events": list(self.history),
        }

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def rank_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state for a checkpoint: the gradient sums and the values at growth of its chunk."""
        out = {f"sum/{n}": s.detach().cpu().contiguous() for n, s in self.sums.items()}
        out["grown_at"] = self.grown_at.contiguous()
        return out

    def load(self, folder: Path, state: dict) -> None:
        """Restore this rank's sums and values at growth and the history from a checkpoint of the same world size."""
        from safetensors.torch import load_file

        path = Path(folder) / REGROW_RANK_FILE.format(rank=fdist.rank())
        if not path.is_file():
            raise ConfigError(
                f"resume: {path.parent} holds no {path.name}: it was written without fish.regrow_every; resume it "
                "with fish.regrow_every=0"
            )
        saved = load_file(str(path))
        for n, s in self.sums.items():
            s.copy_(saved[f"sum/{n}"].to(s.device))
        self.grown_at = saved["grown_at"].clone()
        self.history = list(state.get("regrowth", []))

"""Keeping masked entries fixed, bit for bit, under every DeepSpeed optimizer set-up.

Two mechanisms, both needed (../shared/FISH_TUNING.md traps 2 and 4):
1. A gradient hook on each pool parameter zeroes masked positions of the local gradient before
   DeepSpeed reduces it, so clipping norms and optimizer moments see only selected entries.
2. The torch optimizer inside DeepSpeed (zero.torch_optimizer) is wrapped: after its step, the
   masked entries of the fp32 master weights are written back to their values when the mask was
   fixed. Weight decay, momentum and any optimizer rule therefore cannot move them, and DeepSpeed's
   copy from masters to model weights (bf16 included) then carries unchanged values.

Memory: the masks are held packed (mask.PackedMasks, 1 bit per pool entry) and unpacked one tensor at a
time inside the gradient hook and the restore; the restore keeps only the fp32 values of the frozen entries
of this rank's master partition (4 bytes per frozen local entry; their positions are read from the bits).
Those values are optimizer-side state, counted as `mask_restore_copies` by fishds/memory.py, not as masks.

Where the fp32 masters live depends on the stage; `zero.master_fragments` finds, per parameter, a view of
this rank's master entries and which flat indices of the parameter they hold (DeepSpeed internals, all in
fishds/zero.py); the layout is checked against the model weights at set-up and a mismatch stops the run
instead of training with a wrong mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .. import dist as fdist
from .. import zero
from ..zero import UnsupportedSetup
from ..zero import master_fragments as _master_fragments
from .mask import PackedMasks
from .pool import Pool


@dataclass
class _Fragment:
    name: str
    master: torch.Tensor  # 1-D view of this rank's fp32 master entries of one parameter
    start: int  # flat index in the (padded) parameter of master[0]
    frozen_val: torch.Tensor  # values of the entries the mask freezes, in flat order, when the mask was fixed


class MaskEnforcer:
    """Gradient hooks + optimizer-step wrapper that keep every masked pool entry at its fixed value."""

    def __init__(self, engine, pool: Pool, masks, restore: bool = True):
        self.engine = engine
        self.pool = pool
        self.masks = PackedMasks.of(masks, fdist.device())  # 1 bit per entry; shared with the caller when possible
        self.accumulators: dict[str, torch.Tensor] = {}  # name -> flat fp32 sum of the unmasked gradients (regrow)
        self._hooks = [
            t.param.register_hook(self._grad_hook(t.name))
            for t in pool.tensors
            if bool(self.masks.frozen(t.name).any())
        ]
        self.fragments = self._fragments() if restore else []  # restore=False: fishds.fish.compact never moves them
        opt = zero.torch_optimizer(engine)
        self._inner_step = opt.step

        @functools.wraps(self._inner_step)  # keeps torch's LR-scheduler marker on the step
        def step(*args, **kwargs):
            result = self._inner_step(*args, **kwargs)
            self.restore()
            return result

        opt.step = step

    def _grad_hook(self, name: str):
        shape = torch.Size(self.masks.shape(name))

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if grad.shape != shape:
                return grad
            acc = self.accumulators.get(name)
            if acc is not None:  # fish.regrow_every: the full local gradient, before the mask zeroes it
                acc.add_(grad.detach().reshape(-1).to(acc.device, torch.float32))
            return grad.masked_fill(self.masks.frozen(name).view(shape), 0)  # the current masks (set_masks)

        return hook

    @torch.no_grad()
    def set_masks(self, masks: PackedMasks) -> None:
        """Switch to new masks with the same frozen tensors (fishds/fish/regrow.py): the optimizer's per-entry state
        (moments, momentum) of every entry whose bit changed is zeroed, and the restore set is rebuilt from the
        current fp32 masters (newly frozen entries stay at their current values; grown ones train from theirs)."""
        opt = zero.torch_optimizer(self.engine)
        for f in self.fragments or [
            _Fragment(n, m, s, torch.empty(0)) for n, m, s, _ in _master_fragments(self.engine, self.pool)
        ]:
            n = f.master.numel()
            changed = (self.masks.frozen(f.name, f.start, n) != masks.frozen(f.name, f.start, n)).to(f.master.device)
            if not bool(changed.any()):
                continue
            flat, off = zero.optimizer_state_of(self.engine, f.master)
            for v in opt.state.get(flat, {}).values():
                if torch.is_tensor(v) and v.shape == flat.shape:
                    v.reshape(-1).narrow(0, off, n).masked_fill_(changed, 0)
        self.masks = masks
        if self.fragments:
            self.fragments = self._fragments()

    def _fragments(self) -> list[_Fragment]:
        frags = []
        for name, master, start, local_weights in _master_fragments(self.engine, self.pool):
            if not torch.equal(master[: local_weights.numel()].to(local_weights.dtype), local_weights):
                raise UnsupportedSetup(
                    f"DeepSpeed's fp32 master layout for {name} does not match the model weights; this DeepSpeed "
                    "version is not supported by fishds' mask enforcement (pinned: 0.19.8)"
                )
            frozen = self.masks.frozen(name, start, master.numel()).to(master.device)
            frags.append(_Fragment(name, master, start, master[frozen].clone()))
        return frags

    @torch.no_grad()
    def restore(self) -> None:
        """Write the fixed values back into the masked fp32 master entries (runs after every inner step)."""
        for f in self.fragments:
            if f.frozen_val.numel():
                f.master.masked_scatter_(
                    self.masks.frozen(f.name, f.start, f.master.numel()).to(f.master.device), f.frozen_val
                )

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        zero.torch_optimizer(self.engine).step = self._inner_step


@torch.no_grad()
def reset_unselected(engine, pool: Pool, masks: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    """Set unselected entries back to `initial` (full tensors) in the model weights and the fp32 masters.

    Used after a dense FISH warm-up, before the mask takes over.
    """
    for name, master, start, _ in _master_fragments(engine, pool):
        flat_init = initial[name].reshape(-1).to(master.device, torch.float32)
        flat_mask = masks[name].reshape(-1).to(master.device)
        n = max(0, min(master.numel(), flat_init.numel() - start))
        m, v = flat_mask[start : start + n], flat_init[start : start + n]
        master[:n] = torch.where(m, master[:n], v)
    for t in pool.tensors:
        p, init, m = t.param, initial[t.name], masks[t.name]
        if zero.is_partitioned(p):
            local = zero.local_tensor(p).reshape(-1)
            start = fdist.rank() * local.numel()
            n = max(0, min(local.numel(), t.numel - start))
            lm = m.reshape(-1)[start : start + n].to(local.device)
            lv = init.reshape(-1)[start : start + n].to(local.device, local.dtype)
            local[:n] = torch.where(lm, local[:n], lv)
        else:
            p.data.copy_(torch.where(m.to(p.device), p.data, init.to(p.device, p.dtype)))

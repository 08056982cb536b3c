"""Per-rank byte accounting of a running engine: what this rank really holds, read from the tensors.

`measure(engine, masks, enforcer)` counts, on this rank:
- frozen: frozen parameters' local storage (under ZeRO-3 the partition, so a sharded backbone
  shows 1/world of its bytes), plus bitsandbytes quant states (absmax, code; never partitioned);
- frozen_4bit / frozen_4bit_full: the packed 4-bit weights held locally / at full size;
- trainable: the adapter parameters' local storage (model dtype);
- optimizer: the inner torch optimizer's master copies that are not the model's own tensors (fp32 flat
  partitions under ZeRO 1-3 and bf16) plus its state (Adam moments, momentum). The state exists only
  after the first step; before it, `optimizer_state_allocated` is false and the state is projected from
  the masters' size (2 x for Adam, 1 x for SGD with momentum);
- masks: the masks every rank holds for the gradient hooks, packed at 1 bit per pool entry (mask.PackedMasks);
- mask_restore_copies: the enforcer's fp32 values of the frozen entries of this rank's master partition (4 bytes
  per frozen local entry, optimizer-side state kept apart from masks; none with fish.compact_optimizer);
- local_entries / updated_entries: entries of the tensors the torch optimizer updates on this rank, and how
  many of them it keeps state for and writes (all of them, or the selected ones with fish.compact_optimizer);
- largest_gathered_param: under ZeRO-3 the largest single parameter at full size (what a rank must hold
  when it gathers that layer); otherwise the largest parameter (nothing is gathered);
- rss, peak_rss: this process's resident set size now and at its peak (Linux ru_maxrss).
"""

from __future__ import annotations

import resource

import torch

from . import zero


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _local(p) -> int:
    return _bytes(zero.local_tensor(p))


def _full(p) -> int:
    return zero.full_bytes(p)


def _quant_state_bytes(p) -> int:
    qs = getattr(p, "quant_state", None)
    if qs is None:
        return 0
    total = sum(_bytes(v) for v in (getattr(qs, "absmax", None), getattr(qs, "code", None)) if torch.is_tensor(v))
    s2 = getattr(qs, "state2", None)
    if s2 is not None:
        total += sum(_bytes(v) for v in (s2.absmax, s2.code) if torch.is_tensor(v))
    return total


def optimizer_tensors(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer inside DeepSpeed updates on this rank, each once: its fp32 masters
    (stage 0 in fp32: the parameters themselves). ZeRO-3 lists its flat partitions in the optimizer's
    param_groups only during its step, hence zero.master_partitions as well."""
    opt = zero.inner_optimizer(engine)
    if opt is None:
        return []
    found = zero.master_partitions(engine)  # plus whatever the torch optimizer's groups hold (stage 0: the params)
    found += [p for group in opt.param_groups for p in group["params"]]
    return list({id(t): t for t in found}.values())


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def is_4bit(param) -> bool:
    """A bitsandbytes 4-bit weight (quant.bits=4, fishds/quant.py)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(param, bnb.nn.Params4bit)


def measure(engine, masks: dict | None = None, enforcer=None) -> dict:
    model = engine.module
    out = dict.fromkeys(
        (
            "frozen",
            "frozen_4bit",
            "frozen_4bit_full",
            "quant_state",
            "trainable",
            "optimizer_masters",
            "optimizer_state",
            "masks",
            "largest_gathered_param",
        ),
        0,
    )
    zero3 = engine.zero_optimization_stage() == 3
    own = set()
    for p in model.parameters():
        own.add(id(p))
        local = _local(p)
        if p.requires_grad:
            out["trainable"] += local
        else:
            out["frozen"] += local + _quant_state_bytes(p)
            out["quant_state"] += _quant_state_bytes(p)
            if is_4bit(p):
                out["frozen_4bit"] += local
                out["frozen_4bit_full"] += _full(p)
        out["largest_gathered_param"] = max(out["largest_gathered_param"], _full(p))
    opt = zero.inner_optimizer(engine)
    masters_numel, updated, factor = 0, 0, 0
    if opt is not None:
        for p in optimizer_tensors(engine):
            if id(p) not in own:
                out["optimizer_masters"] += _bytes(p)
            masters_numel += p.numel()
            idx = opt.state.get(p, {}).get("idx") if p in opt.state else None
            updated += p.numel() if idx is None else idx.numel()
        for state in opt.state.values():
            out["optimizer_state"] += sum(_bytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        factor = (
            2 if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else (1 if opt.defaults.get("momentum") else 0)
        )
    out["local_entries"], out["updated_entries"] = masters_numel, updated
    out["optimizer_state_allocated"] = bool(opt is not None and opt.state)
    if not out["optimizer_state_allocated"]:
        out["optimizer_state"] = masters_numel * 4 * factor  # projected: fp32 moments, allocated at the first step
    out["optimizer"] = out["optimizer_masters"] + out["optimizer_state"]
    if masks:
        out["masks"] = masks.nbytes if hasattr(masks, "nbytes") else sum(_bytes(m) for m in masks.values())
    out["mask_restore_copies"] = sum(_bytes(f.frozen_val) for f in getattr(enforcer, "fragments", []) or [])
    if not zero3:
        out["largest_gathered_param"] = 0  # nothing is gathered below ZeRO-3
    out["model_states"] = (
        out["frozen"] + out["trainable"] + out["optimizer"] + out["masks"] + out["mask_restore_copies"]
    )
    out["rss"] = _rss()
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    out["zero_stage"] = engine.zero_optimization_stage()
    return out


def gather(local: dict) -> list[dict]:
    """Every rank's measurement, in rank order (a collective: call on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    items = [None] * dist.get_world_size()
    dist.all_gather_object(items, local)
    return items


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def line(m: dict, world: int) -> str:
    shard = ""
    if m["frozen_4bit_full"]:
        shard = (
            f" (4-bit weights {_mib(m['frozen_4bit'])} of {_mib(m['frozen_4bit_full'])}, "
            f"{m['frozen_4bit'] / m['frozen_4bit_full']:.0%} on this rank)"
        )
    state = "" if m["optimizer_state_allocated"] else " (moments projected, allocated at the first step)"
    return (
        f"[fishds] memory per rank (rank 0 of {world}, ZeRO-{m['zero_stage']}): "
        f"frozen {_mib(m['frozen'])}{shard} | "
        f"trainable {_mib(m['trainable'])} | optimizer {_mib(m['optimizer'])}{state} | masks {_mib(m['masks'])} "
        f"(1 bit/entry) + frozen-entry copies {_mib(m['mask_restore_copies'])} | "
        f"largest gathered layer {_mib(m['largest_gathered_param'])}"
    )

"""Resuming on any number of ranks (or ZeRO stage): the adapter's fp32 masters and optimizer moments, saved whole
and re-partitioned at load.

The trained state of a FISH run is small (the adapter), so every checkpoint also holds world_state.safetensors:
for every trainable tensor its full fp32 master (`param/<name>`) and each per-entry optimizer state
(`exp_avg/<name>`, `exp_avg_sq/<name>`, `momentum_buffer/<name>`), plus the optimizer step count, the LR
scheduler state and DeepSpeed's step counters (world_state.json), and for fish.compact_optimizer each rank's
compact state (optimizer-rank<R>.safetensors, same number of ranks only). Nothing here is pickled: this is what a
resume restores by default, on the same or another number of ranks (fishds/run/checkpoint.py load_checkpoint).
None of it depends on the world size: a checkpoint written on W ranks loads on W' ranks at ZeRO 0-3 by writing
each rank's slice back into DeepSpeed's partitions (located as the mask enforcer locates them,
fishds.zero.master_fragments). The data position is converted through the number of examples consumed. Refused,
naming both world sizes: fish.compact_optimizer (its moments are per selected entry of a partition), a data
position that does not divide, a checkpoint without world_state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import dist as fdist
from .. import zero
from ..config import ConfigError
from ..files import WORLD_STATE_EXTRA as EXTRA
from ..files import WORLD_STATE_FILE as TENSORS
from ..files import WORLD_STATE_LEGACY_EXTRA as LEGACY_EXTRA


def _entry_keys(opt, flat) -> list[str]:
    return sorted(k for k, v in opt.state.get(flat, {}).items() if torch.is_tensor(v) and v.shape == flat.shape)


def _fragments(engine, pool):
    return {name: (master, start) for name, master, start, _ in zero.master_fragments(engine, pool)}


def _reduce(buf: torch.Tensor, engine) -> torch.Tensor:
    if engine.zero_optimization_stage() > 0:  # partitions: each entry lives on one rank; stage 0: all ranks hold all
        dev = fdist.comm_device()
        buf = buf.to(dev)
        fdist.all_reduce_(buf)
    return buf.cpu()


@torch.no_grad()
def gather_state(engine, pool) -> tuple[dict[str, torch.Tensor], dict]:
    """Full fp32 masters and per-entry optimizer states of every pool tensor (a collective: all ranks call it)."""
    opt = zero.torch_optimizer(engine)
    frags = _fragments(engine, pool)
    keys: list[str] = []
    for master, _ in frags.values():
        keys = _entry_keys(opt, zero.optimizer_state_of(engine, master)[0])
        if keys:
            break
    n_keys = torch.tensor([len(keys)], dtype=torch.float64)
    fdist.all_reduce_(n_keys, op=torch.distributed.ReduceOp.MAX)
    if int(n_keys[0]) != len(keys):
        raise RuntimeError("ranks disagree on the optimizer state keys")
    out = {}
    for t in pool.tensors:
        for key in ["param", *keys]:
            buf = torch.zeros(t.numel, dtype=torch.float32)
            if t.name in frags:
                master, start = frags[t.name]
                src = master
                if key != "param":
                    flat, off = zero.optimizer_state_of(engine, master)
                    src = opt.state[flat][key].reshape(-1).narrow(0, off, master.numel())
                n = max(0, min(master.numel(), t.numel - start))
                buf[start : start + n] = src[:n].float().cpu()
            out[f"{key}/{t.name}"] = _reduce(buf, engine).reshape(t.shape)
    steps = [st["step"] for st in opt.state.values() if "step" in st]
    step = torch.tensor([float(steps[0]) if steps else 0.0], dtype=torch.float64)
    fdist.all_reduce_(step, op=torch.distributed.ReduceOp.MAX)
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    return out, {
        "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
        "optimizer_step": int(step[0]),
        "state_keys": keys,
        "lr_scheduler": sched,
        "lr": [g["lr"] for g in opt.param_groups],
    }


def save(folder: Path, tensors: dict, extra: dict) -> None:
    """Rank 0 writes the gathered state into the checkpoint folder: tensors as safetensors, the rest as JSON."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS))
    (folder / EXTRA).write_text(json.dumps(extra, default=_not_json) + "\n")


def _not_json(value):
    raise TypeError(f"{type(value).__name__} in the LR scheduler or optimizer state cannot be written as JSON")


def _load_extra(folder: Path) -> dict:
    """world_state.json; a checkpoint of an older fishds holds world_state.pt, read with torch's weights-only
    unpickler (plain numbers, lists and dicts: it runs no code)."""
    if (folder / EXTRA).is_file():
        return json.loads((folder / EXTRA).read_text())
    return torch.load(folder / LEGACY_EXTRA, weights_only=True)


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"optimizer-rank{rank}.safetensors"


def _state_owners(engine) -> list[torch.Tensor]:
    """The tensors the torch optimizer keeps state for on this rank, in a fixed order."""
    opt = zero.torch_optimizer(engine)
    return zero.master_partitions(engine) or [p for g in opt.param_groups for p in g["params"]]


def save_rank(engine, folder: Path) -> None:
    """Every rank: a compact optimizer's state (moments per selected entry of this rank's partition and their
    indices, fishds/fish/compact.py), which world_state cannot hold, as optimizer-rank<R>.safetensors."""
    from safetensors.torch import save_file

    opt = zero.torch_optimizer(engine)
    if not any("idx" in st for st in opt.state.values()):
        return
    out = {}
    for i, flat in enumerate(_state_owners(engine)):
        for key, v in opt.state.get(flat, {}).items():
            if torch.is_tensor(v):
                out[f"{i}/{key}"] = v.detach().reshape(v.shape).contiguous().cpu()
    save_file(out, str(_rank_file(folder, fdist.rank())))


def _load_rank(engine, folder: Path) -> None:
    path = _rank_file(folder, fdist.rank())
    if not path.is_file():
        return
    from safetensors.torch import load_file

    opt = zero.torch_optimizer(engine)
    saved = load_file(str(path))
    for i, flat in enumerate(_state_owners(engine)):
        st = opt.state[flat]
        for name, v in saved.items():
            idx, key = name.split("/", 1)
            if int(idx) == i:
                st[key] = v.to(flat.device)


def check(
    state: dict,
    folder: Path,
    world: int,
    compact: bool,
    micro_batch_size: int,
    trust_pickle: bool = False,
    regrow: bool = False,
) -> None:
    """Preflight: can the checkpoint written on state['world_size'] ranks resume on `world` ranks, without
    unpickling unless trust_pickle?"""
    saved = state.get("world_size", world)
    where = f"resume: the checkpoint {folder} was written on {saved} rank(s), this run has {world}"
    if saved != world:
        if compact:
            raise ConfigError(
                f"{where}; fish.compact_optimizer keeps moments per selected entry of each rank's partition "
                f"and cannot be re-partitioned: resume on {saved} rank(s) or set "
                "fish.compact_optimizer=false"
            )
        if regrow:
            raise ConfigError(
                f"{where}; fish.regrow_every keeps each rank's gradient sums and its chunk of the values at growth "
                f"(regrow-rank<R>.safetensors), which cannot be re-partitioned: resume on {saved} rank(s)"
            )
        if not (folder / TENSORS).is_file():
            raise ConfigError(
                f"{where}, and it holds no {TENSORS} (written by an older fishds); resume on {saved} rank(s)"
            )
        consumed = state["data_position"] * state.get("micro_batch_size", micro_batch_size) * saved
        if consumed % (micro_batch_size * world):
            raise ConfigError(
                f"{where}: {consumed} examples consumed is not a whole number of micro-batches of "
                f"{micro_batch_size} x {world} ranks; change train.micro_batch_size or the rank count"
            )
    if not trust_pickle and not (folder / TENSORS).is_file():
        raise ConfigError(
            f"resume: the checkpoint {folder} holds no {TENSORS} (written by an older fishds): only DeepSpeed's "
            "pickled engine files could restore it, and loading a pickle runs code of whoever wrote it; set "
            "train.resume_trust_pickle=true if you trust that checkpoint"
        )


def data_position(state: dict, world: int, micro_batch_size: int) -> int:
    saved = state.get("world_size", world)
    consumed = state["data_position"] * state.get("micro_batch_size", micro_batch_size) * saved
    return consumed // (micro_batch_size * world)


@torch.no_grad()
def load_state(engine, pool, folder: Path, same_world: bool = False) -> None:
    """Write the checkpoint's full masters, optimizer states, step count and scheduler state into this run's
    partitions (every rank, no collective); on the number of ranks that wrote it, also a compact optimizer's
    per-rank state. Nothing is unpickled."""
    from safetensors.torch import load_file

    full = load_file(str(folder / TENSORS))
    extra = _load_extra(folder)
    opt = zero.torch_optimizer(engine)
    frags = _fragments(engine, pool)
    deepspeed_opt = zero.is_deepspeed_optimizer(engine)
    step = extra["optimizer_step"]
    for t in pool.tensors:
        p = t.param
        value = full[f"param/{t.name}"].reshape(-1)
        if zero.is_partitioned(p):  # ZeRO-3: this rank's partition of the model weights
            local = zero.local_tensor(p).reshape(-1)
            start = fdist.rank() * local.numel()
            n = max(0, min(local.numel(), t.numel - start))
            local[:n].copy_(value[start : start + n])
        else:
            p.data.copy_(value.reshape(p.shape))
        if t.name not in frags:
            continue
        master, start = frags[t.name]
        n = max(0, min(master.numel(), t.numel - start))
        master[:n].copy_(value[start : start + n])
        flat, off = zero.optimizer_state_of(engine, master)
        st = opt.state[flat]
        for key in extra["state_keys"]:
            if key not in st:
                st[key] = torch.zeros_like(flat)
            st[key].reshape(-1).narrow(0, off, n).copy_(full[f"{key}/{t.name}"].reshape(-1)[start : start + n])
        if step:
            st["step"] = step if deepspeed_opt else torch.tensor(float(step), dtype=torch.float32)
    if engine.lr_scheduler is not None and extra["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(extra["lr_scheduler"])
    for g, lr in zip(opt.param_groups, extra["lr"]):
        g["lr"] = lr
    engine.global_steps = step
    for name, value in extra.get("engine", {}).items():  # the counters DeepSpeed's own checkpoint restores
        setattr(engine, name, value)
    if same_world:
        _load_rank(engine, folder)

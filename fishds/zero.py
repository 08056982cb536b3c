"""Every DeepSpeed internal fishds relies on, in one module (pinned DeepSpeed: 0.19.8).

When DeepSpeed changes its layouts, this file is the one to fix; the enforcement and memory tests
(tests/test_distributed.py, tests/test_compact.py, tests/test_selection_modes.py) say what broke.

- partitioned parameters (ZeRO-3): `ds_id`, `ds_shape`, `ds_numel`, the local partition `ds_tensor`;
- the torch optimizer inside the engine (`engine.basic_optimizer`, or the chain of `.optimizer` wrappers);
- where the fp32 master weights live, per stage (`master_fragments`):
  stage 0 in fp32: the optimizer updates the parameters themselves; stage 0 in bf16: DeepSpeed's
  FP16_UnfusedOptimizer keeps one fp32 copy per parameter (fp32_groups beside fp16_groups);
  ZeRO 1/2 and DeepSpeed's bf16 optimizer: `param._hp_mapping` (a view into the flat fp32 partition);
  ZeRO 3: the optimizer's `fp32_partitioned_groups_flat` at `grad_position[param id]`, which holds partition
  `rank` of the flattened, padded parameter;
- the ZeRO-3 parameter coordinator (`parameter_offload`), which a pass with torch.autograd.grad must clean up;
- the CPU set-up: skipping the build of a shared-memory op only DeepSpeed's inference path uses;
- `import deepspeed` without its autotuner's import of mlflow (import_deepspeed).

DeepSpeed's public `deepspeed.utils.safe_get_local_fp32_param` / `safe_set_local_fp32_param` read and write
one parameter's fp32 partition as a copy (moved to the accelerator); fishds needs writable views of the masters
(the enforcer writes the frozen entries back after every optimizer step, the compact optimizer locates its
tensors by storage), so the views are taken here.
"""

from __future__ import annotations

import sys

import torch


class UnsupportedSetup(RuntimeError):
    """A DeepSpeed set-up whose internals fishds cannot use (layout changed, NVMe offload, ...)."""


# ---- import ----------------------------------------------------------------------------------------------
def import_deepspeed():
    """`import deepspeed`, without the import of mlflow that deepspeed/autotuning/autotuner.py makes at
    `import deepspeed` whenever mlflow is installed (the fishds[trackers] extra): about 3 s of every rank's
    start-up on a CPU core, for an autotuner fishds never runs (its mlflow logging is then off). A later
    `import mlflow` (train.report_to: mlflow) works as usual; so does a process that imported mlflow or
    deepspeed first."""
    if "deepspeed" in sys.modules:
        return sys.modules["deepspeed"]
    blocked = "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError while this entry is None
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


# ---- CPU set-up -------------------------------------------------------------------------------------------
def skip_shm_op_build() -> bool:
    """On DeepSpeed's CPU accelerator, skip the ~1 min compile of a shared-memory all-reduce op that only its
    inference path uses. Returns whether the accelerator is the CPU. Call after selecting the accelerator."""
    import deepspeed.comm.torch  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return True


# ---- parameters ------------------------------------------------------------------------------------------
def is_partitioned(p) -> bool:
    """A ZeRO-3 partitioned parameter."""
    return hasattr(p, "ds_id")


def full_shape(p) -> tuple[int, ...]:
    """The parameter's shape, also under ZeRO-3 (where p.shape is empty while it is partitioned)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def local_tensor(p) -> torch.Tensor:
    """This rank's storage of the parameter: its ZeRO-3 partition, or the tensor itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def full_bytes(p) -> int:
    """Bytes of the parameter at full size (also while ZeRO-3 holds only a partition)."""
    return p.ds_numel * p.element_size() if hasattr(p, "ds_numel") else p.data.numel() * p.data.element_size()


# ---- optimizers ------------------------------------------------------------------------------------------
def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def torch_optimizer(engine):
    """The client torch optimizer DeepSpeed steps (what fishds wraps and what CompactAdamW is)."""
    return engine.basic_optimizer


def inner_optimizer(engine):
    """The torch.optim.Optimizer at the end of the engine's chain of optimizer wrappers (None without one)."""
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _unfused_fp32_copies(opt) -> dict:
    """DeepSpeed's bf16/fp16 optimizer without ZeRO (FP16_UnfusedOptimizer): id(param) -> its fp32 copy."""
    return {
        id(lp): hp
        for lps, hps in zip(getattr(opt, "fp16_groups", None) or [], getattr(opt, "fp32_groups", None) or [])
        for lp, hp in zip(lps, hps)
    }


def stage0_optimizer_state(engine, param, key: str):
    """The torch optimizer's state `key` of a parameter at stage 0 (keyed by the parameter, or by its fp32 copy
    under DeepSpeed's bf16 optimizer without ZeRO); None if absent. ZeRO 1-3: deepspeed.utils.safe_get_full_*."""
    copies = _unfused_fp32_copies(engine.optimizer)
    inner = engine.basic_optimizer if copies else engine.optimizer
    return getattr(inner, "state", {}).get(copies.get(id(param), param), {}).get(key)


# where DeepSpeed keeps this rank's fp32 masters: ZeRO-3 (swapped into the torch optimizer only during its
# step), ZeRO-1/2, the bf16 optimizer
_MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")


def master_partitions(engine) -> list[torch.Tensor]:
    """The flat fp32 master partitions DeepSpeed's optimizer wrapper holds on this rank (empty at stage 0)."""
    return [t for attr in _MASTER_ATTRS for t in getattr(engine.optimizer, attr, None) or [] if torch.is_tensor(t)]


def master_fragments(engine, pool) -> list[tuple[str, torch.Tensor, int, torch.Tensor]]:
    """(name, fp32 master view, start index, local model-weight values) for every pool tensor: a writable
    1-D view of this rank's master entries of the parameter and the flat index of its first entry."""
    opt = engine.optimizer
    out = []
    if is_zero3(engine):
        if getattr(opt, "offload_optimizer", False) and getattr(opt, "swap_optimizer", False):
            raise UnsupportedSetup(
                "FISH masks do not support ZeRO-3 optimizer offload to NVMe; use offload_optimizer.device=cpu or none"
            )
        for t in pool.tensors:
            p = t.param
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            master = opt.fp32_partitioned_groups_flat[group].narrow(0, offset, numel)
            rank = (
                opt._get_param_partition_rank(p)
                if hasattr(opt, "_get_param_partition_rank")
                else torch.distributed.get_rank()
            )
            out.append((t.name, master, rank * numel, p.ds_tensor.reshape(-1)[:numel]))
        return out
    # DeepSpeed's bf16/fp16 optimizer without ZeRO (FP16_UnfusedOptimizer) keeps one fp32 copy per parameter
    unfused = _unfused_fp32_copies(opt)
    for t in pool.tensors:
        p = t.param
        if id(p) in unfused:
            out.append((t.name, unfused[id(p)].data.reshape(-1), 0, p.data.reshape(-1)))
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            addr = mapping.lp_fragment_address
            out.append(
                (
                    t.name,
                    mapping.hp_fragment.reshape(-1),
                    addr.start,
                    p.data.reshape(-1).narrow(0, addr.start, addr.numel),
                )
            )
        elif getattr(p, "_hp_mapping", "absent") is None:
            continue  # this rank's partition holds no entry of p
        elif opt is torch_optimizer(engine) and p.dtype == torch.float32:
            out.append((t.name, p.data.reshape(-1), 0, p.data.reshape(-1)))
        else:
            raise UnsupportedSetup(
                f"cannot locate the fp32 master weights of {t.name} under optimizer "
                f"{type(opt).__name__}; fishds supports DeepSpeed ZeRO 0-3 in fp32 and bf16"
            )
    return out


def optimizer_state_of(engine, master: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor the torch optimizer keeps state for (its key in optimizer.state) that `master` (a view from
    master_fragments) lies in, and master's offset in it. ZeRO-3 swaps its flat fp32 partitions into the torch
    optimizer's param_groups only during a step, so the partitions and the state keys are searched too."""
    opt = torch_optimizer(engine)
    flats = [p for g in opt.param_groups for p in g["params"]] + list(opt.state.keys()) + master_partitions(engine)
    ptr = master.untyped_storage().data_ptr()
    for flat in flats:
        if torch.is_tensor(flat) and flat.untyped_storage().data_ptr() == ptr:
            return flat, master.storage_offset() - flat.storage_offset()
    raise UnsupportedSetup("cannot find the optimizer tensor of an fp32 master (DeepSpeed layout changed?)")


def is_deepspeed_optimizer(engine) -> bool:
    """DeepSpeed's own optimizer (DeepSpeedCPUAdam, FusedAdam: an int step count) rather than a torch one."""
    return type(torch_optimizer(engine)).__module__.startswith("deepspeed")


# ---- ZeRO-3 passes outside engine.backward ---------------------------------------------------------------
def zero3_coordinator(engine):
    """The ZeRO-3 parameter coordinator (None below stage 3): a pass that takes gradients with
    torch.autograd.grad skips the hooks that end a ZeRO-3 backward and must release what they would."""
    return engine.optimizer.parameter_offload.get_param_coordinator() if is_zero3(engine) else None


def release_backward_leftovers(coordinator) -> None:
    """After one torch.autograd.grad under ZeRO-3: release the parameters it left gathered."""
    if coordinator is not None:
        coordinator.release_backward_leftovers()


def end_gradient_pass(engine, coordinator) -> None:
    """After a pass of torch.autograd.grad calls under ZeRO-3: empty the partition cache, reset the trace."""
    if coordinator is not None:
        engine.empty_partition_cache()
        coordinator.reset_step()

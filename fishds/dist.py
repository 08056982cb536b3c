"""Process-group helpers: one place that knows how fishds starts and talks to its ranks.

fishds runs under the `deepspeed` launcher, torchrun, or as a single process. On machines without
CUDA it selects DeepSpeed's CPU accelerator (gloo backend) before DeepSpeed is imported.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .schema import ConfigError


def prefer_cpu_accelerator_if_no_cuda() -> None:
    """Select DeepSpeed's CPU accelerator when no CUDA device exists (must run before `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


TIMEOUT_ENV = "FISHDS_COLLECTIVE_TIMEOUT_S"


def collective_timeout(timeout_minutes: float | None = None) -> datetime.timedelta:
    """The collective timeout: `timeout_minutes` if given, else $FISHDS_COLLECTIVE_TIMEOUT_S seconds, else 1800 s.

    Raises ConfigError (naming the variable) for a value that is not a positive, finite number.
    """
    if timeout_minutes is not None:
        seconds = float(timeout_minutes) * 60.0
        source = f"timeout_minutes={timeout_minutes!r}"
    else:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        source = f"{TIMEOUT_ENV}={raw!r}"
        try:
            seconds = float(raw) if raw else 1800.0
        except ValueError:
            raise ConfigError(f"{source} is not a number of seconds") from None
    if not (seconds > 0 and seconds != float("inf")):
        raise ConfigError(f"{source}: the collective timeout must be a positive, finite number of seconds")
    return datetime.timedelta(seconds=seconds)


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Start the process group through DeepSpeed (env:// rendezvous), single process included.

    Collective timeout: a rank blocked in a collective (all-reduce, barrier, ...) whose peer died or
    hangs raises an error after this long instead of waiting forever. It is `timeout_minutes` when
    given, otherwise the environment variable FISHDS_COLLECTIVE_TIMEOUT_S in seconds (default 1800,
    i.e. 30 minutes; e.g. FISHDS_COLLECTIVE_TIMEOUT_S=600). Keep it well above the longest time a
    healthy rank can wait for the others at one collective (rank 0 saving while the others wait at a
    barrier, a slow node loading the model or tokenizing the data). On gloo (CPU) every collective
    raises after it; on NCCL PyTorch's watchdog enforces it (async error handling is on by default).

    On the CPU accelerator DeepSpeed would compile a shared-memory all-reduce op at start-up
    (about a minute) that only its inference path uses; fishds skips that build.
    """
    timeout = collective_timeout(timeout_minutes)
    prefer_cpu_accelerator_if_no_cuda()
    from . import zero

    deepspeed = zero.import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    zero.skip_shm_op_build()
    default_rendezvous_env()
    deepspeed.init_distributed(timeout=timeout)
    quiet_logs()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())


def close() -> None:
    """Destroy the default process group of this process, if there is one (a local call, not a collective).

    `fishds train` calls it before it exits with a guard's code (fishds/run/guard.py): the interpreter's teardown
    would otherwise destroy the gloo / NCCL communicators' threads in an arbitrary order, and one rank could abort
    there (SIGABRT, "terminate called without an active exception") instead of leaving with the agreed code. Not
    after a normal end: DeepSpeed caches its groups per process, so a later run in the same process (a notebook, a
    test) could not build an engine on a new process group.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def quiet_logs() -> None:
    """Rank 0 prints progress; the other ranks print only errors. Known-harmless library warnings are hidden."""
    import warnings

    for pattern in (
        r"`torch\.distributed\.\w+` is deprecated",
        r"`torch\.jit\.script_method` is deprecated",
        r"`is_gradient_checkpointing` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    if not is_main():
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")


def default_rendezvous_env() -> None:
    """A world of one process when no launcher set one up (DeepSpeed would otherwise try MPI)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """The accelerator device of this rank (cpu on the CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name) if name == "cpu" else torch.device(name, local_rank())


def comm_device() -> torch.device:
    """Where collective buffers must live: the GPU under NCCL (which refuses CPU tensors), else the CPU."""
    return device() if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group (a CPU tensor goes through the GPU under NCCL)."""
    if dist.is_initialized() and world_size() > 1:
        dev = comm_device()
        if t.device == dev:
            dist.all_reduce(t, op=op)
        else:
            buf = t.to(dev)
            dist.all_reduce(buf, op=op)
            t.copy_(buf)
    return t


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)

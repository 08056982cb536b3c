"""Process-group helpers: one place that knows how fishds starts and talks to its ranks.

fishds runs under the `deepspeed` launcher, torchrun, or as a single process. On machines without
CUDA it selects DeepSpeed's CPU accelerator (gloo backend) before DeepSpeed is imported.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def prefer_cpu_accelerator_if_no_cuda() -> None:
    """Select DeepSpeed's CPU accelerator when no CUDA device exists (must run before `import deepspeed`)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Start the process group through DeepSpeed (env:// rendezvous), single process included.

    On the CPU accelerator DeepSpeed would compile a shared-memory all-reduce op at start-up
    (about a minute) that only its inference path uses; fishds skips that build.
    """
    prefer_cpu_accelerator_if_no_cuda()
    import sys

    import deepspeed
    import deepspeed.comm.torch  # noqa: F401
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    deepspeed.init_distributed(timeout=datetime.timedelta(minutes=timeout_minutes))
    quiet_logs()
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank())


def quiet_logs() -> None:
    """Rank 0 prints progress; the other ranks print only errors. Known-harmless library warnings are hidden."""
    import warnings

    for pattern in (r"`torch\.distributed\.\w+` is deprecated", r"`torch\.jit\.script_method` is deprecated",
                    r"`is_gradient_checkpointing` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)
    if not is_main():
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")


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


def all_reduce_(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group."""
    if dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)

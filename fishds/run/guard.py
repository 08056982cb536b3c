"""What stops a run early, on every rank at the same step, and the exit code it ends with.

Exit codes (the process of every rank; torchrun itself exits 1 and prints each rank's code as `exitcode`,
the `deepspeed` launcher and a single process exit with it):

- 0   the run finished (adapter and fish_report.json written)
- 2   bad input (fishds.config.ConfigError), before any heavy work
- 3   EXIT_DIVERGED: a non-finite loss or gradient norm (more than train.max_nonfinite_steps of them); the adapter is
      not written, the last complete checkpoint stays
- 74  EXIT_WRITE_FAILED: a checkpoint or output could not be written (a full disk, a file-size limit, a read-only
      folder); the previous complete checkpoint and the outputs already written stay
- 75  EXIT_PREEMPTED: SIGTERM or SIGUSR1 arrived; every rank finished its optimizer step, a checkpoint was written
      at that step (sysexits EX_TEMPFAIL: run the same command again, resume=auto continues)

Preemption: the handler (SIGTERM, SIGUSR1, installed by `Guard.install_signals` in the main thread of every rank)
only records the signal. Once per optimizer step every rank all-reduces one small tensor (its "signal seen" flag,
its "non-finite loss" flag and its loss share), so a signal that reached one rank, all of them or only the launcher
(torchrun forwards SIGTERM to its workers) stops every rank after the same step. A signal during the head steps,
the dense steps or the Fisher pass stops the run as soon as the mask is fixed: a checkpoint at step
fish.head_steps + fish.dense_steps (the mask, the adapter and the optimizer state at that point) is written then; a
signal during evaluation or a checkpoint is seen at the next step.

Divergence: a step whose loss (any rank's) or gradient norm is not finite makes no update: the torch optimizer's
step is skipped on every rank (the fp32 masters, moments and masked entries stay bit for bit), or DeepSpeed skipped
it itself (ZeRO-1/2 in fp32 skip a step whose global norm is not finite; its fp16 loss-scaler skips are overflow
handling and not counted here). Up to train.max_nonfinite_steps such steps are skipped (metrics.jsonl marks them
"skipped": true and counts them in "nonfinite_steps"); the next one stops the run with EXIT_DIVERGED. A step whose
gradient norm is not finite but that DeepSpeed applied (bf16 without bf16.check_grad_overflow) stops the run at once.

Cost at 7B: one all-reduce of 3 float64 per optimizer step and one device synchronisation (the step's losses are
read before the optimizer step instead of after it); nothing that grows with the model.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys

import torch

from .. import dist as fdist
from .. import zero

EXIT_DIVERGED = 3
EXIT_WRITE_FAILED = 74
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_ACTIVE: Guard | None = None


class RunStopped(SystemExit):
    """The run stops early with a documented exit code (a SystemExit: launchers and scripts exit with it)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message
        if fdist.is_main():
            print(message, file=sys.stderr, flush=True)
            print(message, flush=True)


class Diverged(RunStopped):
    def __init__(self, message: str):
        super().__init__(EXIT_DIVERGED, message)


class Preempted(RunStopped):
    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED, message)


class WriteFailed(RunStopped):
    def __init__(self, message: str):
        super().__init__(EXIT_WRITE_FAILED, message)


def active() -> Guard | None:
    """The guard of the run in progress (None outside `fishds train`)."""
    return _ACTIVE


class Guard:
    """Signals and non-finite steps of one run; `agree` is its one collective per optimizer step."""

    def __init__(self, max_nonfinite_steps: int = 0, lr_hint: str = "train.lr"):
        self.allowance = max_nonfinite_steps
        self.nonfinite_steps = 0  # skipped so far in this process (a resumed run counts from its checkpoint on)
        self.signal: int | None = None  # the first signal this rank received
        self.stop = False  # all ranks agreed to stop after the current step
        self.skip = False  # the optimizer step in progress is skipped (read by the optimizer wrapper)
        self.step = 0  # the optimizer step in progress
        self._inner_step = None
        self.lr_hint = lr_hint

    # ---- set-up ---------------------------------------------------------------------------------------------
    def install(self, engine) -> Guard:
        """Make this the active guard, handle SIGTERM/SIGUSR1 and wrap the torch optimizer's step (skippable)."""
        global _ACTIVE
        _ACTIVE = self
        self.install_signals()
        opt = zero.torch_optimizer(engine)
        if opt is not None and self._inner_step is None:
            inner = self._inner_step = opt.step

            @functools.wraps(inner)  # keeps torch's LR-scheduler marker on the step
            def step(*args, **kwargs):  # ZeRO-3 calls it once per sub-group: no collective in here
                return None if self.skip else inner(*args, **kwargs)

            opt.step = step
        return self

    def install_signals(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal is None:
            self.signal = signum
            name = signal.Signals(signum).name
            os.write(
                2,
                f"[fishds] rank {fdist.rank()}: {name} received: stopping after the current optimizer step and "
                "writing a checkpoint\n".encode(),
            )

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)

    # ---- the per-step collective ----------------------------------------------------------------------------
    def agree(self, local_bad: bool = False, loss: float = 0.0) -> tuple[bool, float]:
        """All ranks: (any rank's loss or norm not finite, the summed loss); sets self.stop when any rank saw a
        signal. One all-reduce of 3 numbers."""
        flags = torch.tensor([float(local_bad), float(self.signal is not None), loss], dtype=torch.float64)
        fdist.all_reduce_(flags)
        if flags[1] > 0:
            self.stop = True
        return bool(flags[0] > 0) or not math.isfinite(float(flags[2])), float(flags[2])

    def fault_hooks(self) -> None:
        """Fault injection for tests, once step STEP is agreed on every rank (STEP 0: before the mask is fixed):
        FISHDS_FAULT_SIGNAL=STEP:RANK[:NAME] sends this rank the signal (default SIGTERM);
        FISHDS_FAULT_KILL=STEP:RANK SIGKILLs it (in the first attempt of a torchrun --max-restarts job only)."""
        here = f"{self.step}:{fdist.rank()}"
        spec = os.environ.get("FISHDS_FAULT_SIGNAL", "")
        if spec and spec.split(":")[:2] == here.split(":"):
            os.kill(os.getpid(), getattr(signal, spec.split(":")[2] if spec.count(":") == 2 else "SIGTERM"))
        if os.environ.get("FISHDS_FAULT_KILL") == here and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- after an optimizer step ----------------------------------------------------------------------------
    def after_step(self, bad_loss: bool, loss: float, grad_norm: float | None, lr: float, ds_skipped: bool, fp16: bool):
        """Count a skipped non-finite step or stop the run (the same decision on every rank: its inputs are
        agreed or global). Returns True when the step made no update."""
        bad_norm = grad_norm is not None and not math.isfinite(grad_norm)
        if not (bad_loss or bad_norm):
            return False
        if bad_norm and not bad_loss and ds_skipped and fp16:
            return True  # DeepSpeed's fp16 loss scaler: an overflow it handles (lower scale), not a divergence
        what = f"step {self.step}: loss {loss}, gradient norm {grad_norm}, learning rate {lr:.3g}"
        if bad_norm and not (bad_loss or ds_skipped):
            raise Diverged(
                f"[fishds] diverged at {what}; DeepSpeed applied this update (it does not check the gradients in "
                f"this set-up), so the weights are not finite and the run stops at once. {self.advice()}"
            )
        self.nonfinite_steps += 1
        if self.nonfinite_steps > self.allowance:
            raise Diverged(
                f"[fishds] diverged at {what} (non-finite step {self.nonfinite_steps}, train.max_nonfinite_steps="
                f"{self.allowance}); this step made no update; the adapter is not written and the last complete "
                f"checkpoint stays. {self.advice()}"
            )
        fdist.print0(
            f"[fishds] {what}: not finite, skipped with no update ({self.nonfinite_steps} of at most "
            f"{self.allowance}, train.max_nonfinite_steps)"
        )
        return True

    def advice(self) -> str:
        return (
            f"Try: a lower {self.lr_hint} (or a longer train.lr_warmup_steps), bf16 rather than fp16, gradient "
            "clipping (train.grad_clip, the max gradient norm, e.g. 1.0), fewer target modules or a smaller peft.r; "
            "train.max_nonfinite_steps=N skips up to N isolated bad steps"
        )


def restarts_share_the_store() -> bool:
    """torchrun restarts workers (--max-restarts > 0) that share its rendezvous store, which can hand a restarted
    attempt the addresses of the last one (pytorch/pytorch#135712); torchrun passes the variable to its workers."""
    return (
        int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0") != "1"
    )


def write_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def agree_writes(failure: str | None, what: str) -> None:
    """All ranks (a collective, in place of a barrier): raise WriteFailed on every rank when any rank's write of
    `what` failed (`failure`: that rank's error, None when its writes succeeded)."""
    flag = torch.tensor([0.0 if failure is None else float(fdist.rank() + 1)], dtype=torch.float64)
    fdist.all_reduce_(flag, op=torch.distributed.ReduceOp.MAX)
    if flag[0] > 0:
        failed = int(flag[0]) - 1
        if failure is not None and not fdist.is_main():
            print(f"[fishds] rank {fdist.rank()}: writing {what} failed: {failure}", file=sys.stderr, flush=True)
        detail = f": {failure}" if failure is not None else f" on rank {failed} (its error is in its log)"
        raise WriteFailed(
            f"[fishds] writing {what} failed{detail}; the run stops (exit code {EXIT_WRITE_FAILED}). The previous "
            "complete checkpoint and the outputs written before stay; free disk space (or fix the folder's "
            "permissions) and run the same command again (resume=auto)"
        )


def fault_file_size_limit(step: int) -> None:
    """FISHDS_FAULT_FSIZE=STEP:RANK:BYTES: from checkpoint STEP on, this rank cannot write files over BYTES (a full
    disk, for tests; Python ignores SIGXFSZ, so the write raises EFBIG)."""
    spec = os.environ.get("FISHDS_FAULT_FSIZE", "")
    if spec:
        at, rank, size = (int(x) for x in spec.split(":"))
        if at == step and rank == fdist.rank():
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

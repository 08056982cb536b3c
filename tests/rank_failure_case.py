"""Test driver for tests/test_rank_failure.py: a peer of rank 0 fails while rank 0 waits in a collective.

    python tests/rank_failure_case.py kill   # rank 1 SIGKILLs itself, rank 0 enters all_reduce
    python tests/rank_failure_case.py hang   # rank 1 stays alive but never joins; rank 0 enters all_reduce

Start it as 2 ranks (torchrun, or plain processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT). The process
group comes from fishds.dist.init_distributed, so FISHDS_COLLECTIVE_TIMEOUT_S bounds rank 0's wait. Rank 0
prints one line `RESULT {...}` and exits 3 when the collective failed (0 if it unexpectedly returned).
"""

import json
import os
import signal
import sys
import time

from fishds.dist import collective_timeout, init_distributed, prefer_cpu_accelerator_if_no_cuda  # noqa: E402

prefer_cpu_accelerator_if_no_cuda()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

mode = sys.argv[1]
assert mode in ("kill", "hang"), mode
init_distributed()
rank = dist.get_rank()
print(
    f"rank {rank} of {dist.get_world_size()} up, collective timeout {collective_timeout().total_seconds():.0f}s",
    flush=True,
)
dist.barrier()  # both ranks are connected before one of them fails
if rank == 1:
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)  # "hang": alive, holding its sockets open, never joining the collective
    sys.exit(0)
time.sleep(0.5)  # let rank 1 go first
t0 = time.monotonic()
try:
    dist.all_reduce(torch.ones(4))
    outcome, error = "returned", ""
except Exception as e:  # noqa: BLE001 - whatever the backend raises: what matters is that it raises
    outcome, error = "raised", f"{type(e).__name__}: {str(e)[:300]}"
print(
    "RESULT " + json.dumps({"outcome": outcome, "seconds": round(time.monotonic() - t0, 2), "error": error}), flush=True
)
os._exit(3 if outcome == "raised" else 0)  # no process-group teardown: it could wait on the dead peer again

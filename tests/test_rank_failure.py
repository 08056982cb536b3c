"""A dead or stuck peer ends the run in bounded time: no rank waits in a collective forever.

fishds.dist.init_distributed takes its collective timeout from FISHDS_COLLECTIVE_TIMEOUT_S (seconds). Driver:
tests/rank_failure_case.py (rank 1 fails, rank 0 enters an all_reduce).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

CASE = "tests/rank_failure_case.py"
BOUND_S = 90  # the whole launch must end within this, far below the 1800 s default timeout


def _env(timeout_s: int, **extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FISHDS_COLLECTIVE_TIMEOUT_S=str(timeout_s))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # whatever an earlier in-process test left behind
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd: list[str], env: dict) -> subprocess.Popen:
    # own session, so that the whole tree this test started can be ended by its process-group id
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _end(proc: subprocess.Popen) -> str:
    """Kill the process group of `proc` (if still alive) and return its output."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out, _ = proc.communicate(timeout=30)
    return out


def _result(output: str) -> dict:
    lines = [ln for ln in output.splitlines() if ln.startswith("RESULT ")]
    assert lines, output[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_torchrun_launch_ends_when_a_rank_is_killed():
    """torchrun, 2 ranks: rank 1 SIGKILLs itself while rank 0 is in all_reduce -> non-zero exit, bounded."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", CASE, "kill"]
    t0 = time.monotonic()
    proc = _start(cmd, _env(20))
    try:
        proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running after {BOUND_S}s:\n{_end(proc)[-4000:]}")
    elapsed = time.monotonic() - t0
    out = _end(proc)
    assert proc.returncode != 0, out[-4000:]
    assert elapsed < BOUND_S
    assert "collective timeout 20s" in out, out[-4000:]  # the variable reached init_distributed


@pytest.mark.parametrize(
    "mode,timeout_s,min_s",
    [
        ("kill", 20, 0.0),  # the peer's sockets close: gloo fails the collective at once
        ("hang", 12, 10.0),  # the peer lives on but never joins: only the collective timeout ends the wait
    ],
)
def test_survivor_exits_on_its_own_timeout(mode, timeout_s, min_s):
    """Plain processes (no launcher to tear the survivor down): rank 0 must leave the collective with an error."""
    port = _free_port()
    procs = [
        _start(
            [sys.executable, CASE, mode],
            _env(
                timeout_s,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
        )
        for r in (0, 1)
    ]
    try:
        try:
            procs[0].wait(timeout=BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waiting after {BOUND_S}s ({mode}):\n{_end(procs[0])[-4000:]}")
    finally:
        outputs = [_end(p) for p in procs]  # rank 1 of "hang" is still sleeping: end it
    assert procs[0].returncode == 3, outputs[0][-4000:]
    res = _result(outputs[0])
    assert res["outcome"] == "raised", res
    assert min_s <= res["seconds"] < BOUND_S, res
    if mode == "hang":
        assert res["seconds"] < timeout_s + 30, res  # the configured timeout, not the 1800 s default
        assert "time" in res["error"].lower(), res
    if mode == "kill":
        assert procs[1].returncode == -signal.SIGKILL, outputs[1][-2000:]


def test_collective_timeout_from_environment(monkeypatch):
    from fishds.config import ConfigError
    from fishds.dist import collective_timeout

    monkeypatch.delenv("FISHDS_COLLECTIVE_TIMEOUT_S", raising=False)
    assert collective_timeout().total_seconds() == 1800
    monkeypatch.setenv("FISHDS_COLLECTIVE_TIMEOUT_S", "20")
    assert collective_timeout().total_seconds() == 20
    assert collective_timeout(timeout_minutes=2).total_seconds() == 120  # an explicit argument wins
    for bad in ("abc", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("FISHDS_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="FISHDS_COLLECTIVE_TIMEOUT_S"):
            collective_timeout()

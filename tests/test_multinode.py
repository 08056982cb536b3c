"""Two nodes give the same result as one: torchrun --nnodes 2 (one rank per node, both on this machine) against
torchrun --standalone --nproc_per_node 2, same overrides, ZeRO-3: the same mask and the same adapter bits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, base_overrides, launch, launch_command
from safetensors.torch import load_file

from fishds.fish.mask import load_masks

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(overrides: list[str], ds_config: str) -> list[tuple[int, str]]:
    """Node 0 and node 1 as two concurrent torchrun launchers (static rendezvous on 127.0.0.1), one rank each."""
    port = _free_port()
    script_args = launch_command(1, overrides, ds_config)[1:]  # the script, --ds_config and the overrides
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--rdzv_backend",
            "static",
        ] + script_args
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:  # a node left waiting for its peer: end the process group this test started
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate(timeout=30)
    if len(results) < 2:
        pytest.fail(f"the two-node launch did not finish within {TIMEOUT_S}s")
    return results


def test_two_nodes_match_one_node_zero3(toy, tmp_path):
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    launch(2, base_overrides(toy, one), "zero3.json")
    for node, (rc, out) in enumerate(launch_two_nodes(base_overrides(toy, two), "zero3.json")):
        assert rc == 0, f"node {node} failed ({rc}):\n{out[-6000:]}"

    masks_one, masks_two = load_masks(one / "fish_mask.safetensors"), load_masks(two / "fish_mask.safetensors")
    assert sorted(masks_one) == sorted(masks_two)
    for key in masks_one:  # tensor by tensor: the safetensors metadata order may differ between files
        assert torch.equal(masks_one[key], masks_two[key]), f"mask of {key} differs"
    assert sum(int(m.sum()) for m in masks_one.values()) > 0

    a_one, a_two = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert sorted(a_one) == sorted(a_two)
    for key in a_one:
        assert a_one[key].dtype == a_two[key].dtype and torch.equal(a_one[key], a_two[key]), f"adapter {key} differs"

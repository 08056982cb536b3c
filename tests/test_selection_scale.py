"""bench/selection_scale.py on 2 real ranks at a tiny size: same selection as gathering, constant traffic."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_selection_scale_bench_two_ranks():
    sizes = [20000, 100003]  # 100003: uneven chunks, not a multiple of 8
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "bench/selection_scale.py",
        "--sizes",
        ",".join(map(str, sizes)),
        "--keep_ratio",
        "0.01",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["pool"] for r in rows] == sizes, proc.stdout
    for r in rows:
        assert r["world"] == 2 and r["k"] == int(0.01 * r["pool"])
        assert r["same_selection"] is True, r
        assert r["n_above"] < r["k"] < r["n_above"] + r["n_tied"], r  # the boundary cuts a tie group
        assert r["mask_share_bytes"] == -(-(-(-r["pool"] // 2)) // 8)  # one packed chunk per rank
        assert r["gather_bytes"] >= 4 * r["pool"] // 2
    bytes_per_rank = [r["bytes_per_rank"] for r in rows]
    assert max(bytes_per_rank) - min(bytes_per_rank) <= 8 * 4, bytes_per_rank  # within a few int64
    assert max(bytes_per_rank) <= 64 * 1024  # a few small collectives, nowhere near the 4 bytes per entry of a gather

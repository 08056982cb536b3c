"""What the bench scripts share: a fishds session from --config / --ds_config / overrides, result lines appended
to bench/results/<name>.jsonl ($FISHDS_BENCH_RESULTS/<name>.jsonl when set), and the torchrun command that starts
a script on several local ranks."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("FISHDS_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def session(args, prefix: str, extra: list[str] = ()):
    """(cfg, fishds.run.train.Session) for args.config + `extra` + args.overrides, writing into a fresh temp folder."""
    from fishds.config import load_config
    from fishds.run.train import setup

    cfg = load_config(
        args.config,
        list(extra) + ["overwrite=true", "output_dir=" + tempfile.mkdtemp(prefix=prefix)] + list(args.overrides),
    )
    return cfg, setup(cfg, args.ds_config)


def record(name: str, rec: dict) -> None:
    """Print `rec` as one JSON line and append it to bench/results/<name>.jsonl."""
    print(json.dumps(rec), flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    with (RESULTS_DIR / f"{name}.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


def torchrun(script, ranks: int, args) -> list[str]:
    """The command that starts `script` with `args` on `ranks` local ranks (torchrun, one standalone node)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        str(script),
        *[str(a) for a in args],
    ]

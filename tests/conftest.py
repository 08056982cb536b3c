"""Shared fixtures: a tiny local model and data, and a launcher for real multi-rank DeepSpeed runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toy import make_tiny_llama, write_alpaca  # noqa: E402


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    return {
        "model": str(make_tiny_llama(root / "model")),
        "train": str(write_alpaca(root / "train.jsonl", 256, seed=0)),
        "eval": str(write_alpaca(root / "eval.jsonl", 32, seed=1)),
        "root": root,
    }


def base_overrides(toy: dict, out: Path, **extra) -> list[str]:
    """A small but complete run: LoRA r=4 on q,v of a 2-layer Llama, 16 Fisher samples, 4 steps."""
    o = {
        "model.name_or_path": toy["model"],
        "data.path": toy["train"],
        "data.eval_path": toy["eval"],
        "data.max_length": 64,
        "data.max_eval_examples": 16,
        "peft.r": 4,
        "peft.alpha": 8,
        "peft.target_modules": "[q_proj,v_proj]",
        "fish.num_samples": 16,
        "fish.keep_ratio": 0.25,
        "train.max_steps": 4,
        "train.lr": 0.01,
        "train.micro_batch_size": 4,
        "output_dir": str(out),
        "train.report_png": "false",  # the picture costs 1-3 s per run; tests/test_trainer_features.py draws it
    }
    if not {"fish.dense_steps", "fish.warmup_steps"} & set(extra):
        o["fish.dense_steps"] = 0  # score at init: the tests check the mechanics against references at step 0
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def launch(
    ranks: int,
    overrides: list[str],
    ds_config: str | None = None,
    script: str = "tests/dist_case.py",
    timeout: int = 300,
    expect_ok: bool = True,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """Run a fishds job with `ranks` real processes (torchrun, gloo on CPU) and return the finished process."""
    cmd = launch_command(ranks, overrides, ds_config, script)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def launch_command(
    ranks: int, overrides: list[str], ds_config: str | None = None, script: str = "tests/dist_case.py"
) -> list[str]:
    if ranks == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script]
    if ds_config:
        cmd += ["--ds_config", str(ROOT / "ds_configs" / ds_config)]
    return cmd + overrides

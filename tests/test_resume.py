"""Kill a rank (SIGKILL) mid-training or while a checkpoint is written, resume with resume=auto: same adapter bits."""

from __future__ import annotations

import json
import os
import subprocess
import time

import psutil
import torch
from conftest import ROOT, base_overrides, launch, launch_command
from safetensors.torch import load_file

from fishds.run.checkpoint import complete_checkpoints

STEPS = {
    "train.max_steps": 40,
    "train.save_every": 10,
    "train.keep_checkpoints": 2,
    "train.weight_decay": 0.1,
    "data.max_eval_examples": 4,
}


def assert_same_adapter(a, b):
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs after resume"


def train_lines(out) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"phase": "train"' in line)


def test_sigkill_mid_training_then_resume_reaches_the_same_adapter(toy, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    launch(2, base_overrides(toy, ref, **STEPS), "zero3.json")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        launch_command(2, base_overrides(toy, out, **STEPS), "zero3.json"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while train_lines(out) < 25 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    workers = psutil.Process(proc.pid).children(recursive=True)
    os.kill(workers[-1].pid, 9)
    assert proc.wait(timeout=120) != 0
    assert not (out / "fish_report.json").exists()
    done = [p.name for p in complete_checkpoints(out)]
    assert done and done[-1] >= "step-00000020", done
    launch(2, base_overrides(toy, out, **STEPS), "zero3.json")  # resume=auto is the default
    assert_same_adapter(ref, out)
    steps = [
        json.loads(line)["step"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"phase": "train"' in line
    ]
    assert steps == list(range(1, 41)), "metrics.jsonl holds each step once after the resume"
    assert len(complete_checkpoints(out)) == 2


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(toy, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    launch(2, base_overrides(toy, ref, **STEPS), "zero2.json")
    proc = launch(
        2,
        base_overrides(toy, out, **STEPS),
        "zero2.json",
        expect_ok=False,
        timeout=240,
        env={"FISHDS_FAULT_KILL_IN_CHECKPOINT": "20:1"},
    )
    assert proc.returncode != 0
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000010"]
    assert (out / "checkpoints" / ".tmp-step-00000020").is_dir(), "the half-written checkpoint stays a temp folder"
    launch(2, base_overrides(toy, out, **STEPS), "zero2.json")
    assert_same_adapter(ref, out)
    assert not (out / "checkpoints" / ".tmp-step-00000020").exists()


def test_mask_file_reuse_and_mismatch(toy, tmp_path):
    """fish.mask_path trains with an earlier run's mask; a mask of other shapes fails naming fish.mask_path."""
    first, second, wrong = tmp_path / "first", tmp_path / "second", tmp_path / "wrong"
    launch(1, base_overrides(toy, first, **{"fish.selection": "random"}))
    launch(1, base_overrides(toy, second, **{"fish.mask_path": first / "fish_mask.safetensors"}))
    from fishds.fish.mask import load_masks

    a, b = load_masks(first / "fish_mask.safetensors"), load_masks(second / "fish_mask.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    proc = launch(
        1,
        base_overrides(toy, wrong, **{"fish.mask_path": first / "fish_mask.safetensors", "peft.r": 8}),
        script="launch/train.py",
        expect_ok=False,
    )
    assert proc.returncode == 2 and "fish.mask_path=" in proc.stderr and "shape" in proc.stderr, proc.stderr[-2000:]


def test_overwrite_moves_old_checkpoints_aside(toy, tmp_path):
    out = tmp_path / "run"
    ov = base_overrides(toy, out, **{"train.max_steps": 4, "train.save_every": 2})
    launch(1, ov)
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    proc = launch(1, ov, script="launch/train.py", expect_ok=False)
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr
    launch(1, ov + ["overwrite=true"])
    moved = list(out.glob("checkpoints.replaced-*"))
    assert len(moved) == 1 and (moved[0] / "step-00000002" / "fishds_state.json").is_file()

"""What clusters do to long runs, with real ranks (2, torchrun, gloo): divergence, preemption signals, a failed
checkpoint write, a damaged checkpoint, a planted pickle, an elastic restart after a SIGKILL. Exit codes:
fishds/run/guard.py. Launches are few: each test chains several faults on one output folder."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, base_overrides, launch, launch_command
from safetensors.torch import load_file, save_file

from fishds.cache import file_record
from fishds.fish.mask import load_masks
from fishds.run.checkpoint import complete_checkpoints, verify
from fishds.run.guard import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_WRITE_FAILED

STEPS = {
    "train.max_steps": 12,
    "train.save_every": 4,
    "train.keep_checkpoints": 3,
    "train.weight_decay": 0.1,
    "data.max_eval_examples": 4,
}


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    x, y = adapter(a), adapter(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs after the interruptions"


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_steps(out) -> list[int]:
    return [r["step"] for r in records(out) if r.get("phase") == "train"]


def worker_exit(proc, code: int) -> bool:
    """torchrun exits 1 when a worker fails and names each worker's exit code in its error summary."""
    return f"exitcode  : {code}" in proc.stderr or f"exitcode: {code}" in proc.stderr


def ckpt(out, step):
    return out / "checkpoints" / f"step-{step:08d}"


class Payload:
    """A pickle that, when loaded, writes a marker file (what a hostile checkpoint could do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_skip_write_failure_damaged_checkpoint_pickle_divergence_and_preemption_zero2(toy, tmp_path):
    """ZeRO-2, train.max_nonfinite_steps=1 and a NaN loss on rank 1 at step 3 in every run (the reference too),
    one output folder:
    1. step 3 is skipped on both ranks (no optimizer step: its step count stays behind), and rank 0 cannot write
       files over 4 KiB from the checkpoint at step 8 on (a full disk): every rank stops with exit code 74, the
       checkpoint at step 4 stays the newest complete one, no temporary folder is left;
    2. a newer checkpoint (step 6) has a truncated tensor file, and every pickled file of the one at step 4 holds a
       payload: resume=auto falls back to step 4, says so, and never runs the payload; a second NaN loss (rank 0,
       step 6) is one more than allowed (the count of step 3 came back from the checkpoint): every rank stops with
       exit code 3, no adapter is written, the checkpoint stays intact;
    3. SIGUSR1 to rank 1 only, at a random step: both ranks stop after the same step with a checkpoint there
       (exit code 75);
    4. the final outputs cannot be written: exit code 74, the outputs already there unchanged; the next resume
       finishes with the adapter of an uninterrupted run, bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    extra = {**STEPS, "train.max_nonfinite_steps": 1}
    nan = {"FISHDS_FAULT_NAN_LOSS": "3:1"}
    ov = base_overrides(toy, out, **extra)
    launch(2, base_overrides(toy, ref, **extra), "zero2.json", env=nan)
    # 1. a skipped step, then a failed write
    proc = launch(2, ov, "zero2.json", expect_ok=False, env={**nan, "FISHDS_FAULT_FSIZE": "8:0:4096"})
    assert proc.returncode != 0 and worker_exit(proc, EXIT_WRITE_FAILED), proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "writing the checkpoint" in text and "failed: " in text, text[-3000:]
    assert "step 3: loss nan" in text and "skipped with no update" in text, text[-3000:]
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert verify(ckpt(out, 4)) is None
    assert (out / "fish_mask.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    assert max(train_steps(out)) == 8
    assert json.loads((ckpt(out, 4) / "world_state.json").read_text())["optimizer_step"] == 3
    rec = {r["step"]: r for r in records(out) if r.get("phase") == "train"}
    assert rec[3]["skipped"] is True and rec[3]["nonfinite_steps"] == 1 and rec[3]["loss"] != rec[3]["loss"]
    assert "skipped" not in rec[4] and rec[4]["nonfinite_steps"] == 1 and "nonfinite_steps" not in rec[2]
    # 2. a newer checkpoint that is damaged (a copy of step 4 with a truncated tensor file, named step 6),
    # and pickles planted in every pickled file of the intact one
    shutil.copytree(ckpt(out, 4), ckpt(out, 6))
    ws = ckpt(out, 6) / "world_state.safetensors"
    ws.write_bytes(ws.read_bytes()[: ws.stat().st_size // 2])
    marker = tmp_path / "payload-ran"
    planted = [p for p in ckpt(out, 4).rglob("*") if p.is_file() and p.suffix in (".pt", ".pkl", ".bin")]
    assert any(p.parent.name == "state" for p in planted), planted  # DeepSpeed's engine files
    for p in planted:
        p.write_bytes(pickle.dumps(Payload(marker)))
    state4 = json.loads((ckpt(out, 4) / "fishds_state.json").read_text())
    for p in planted:  # re-record them, so that the checkpoint verifies: only the pickles are hostile
        state4["files"][p.relative_to(ckpt(out, 4)).as_posix()] = file_record(p)
    (ckpt(out, 4) / "fishds_state.json").write_text(json.dumps(state4))
    assert verify(ckpt(out, 6)) is not None and verify(ckpt(out, 4)) is None
    proc = launch(2, ov, "zero2.json", expect_ok=False, env={"FISHDS_FAULT_NAN_LOSS": "3:1,6:0"})
    text = proc.stdout + proc.stderr
    assert "step-00000006 is damaged (world_state.safetensors is" in text and "(step 4)" in text, text[-3000:]
    assert not marker.exists(), "a default resume unpickled a planted payload"
    assert proc.returncode != 0 and worker_exit(proc, EXIT_DIVERGED), proc.stderr[-3000:]
    assert "diverged at step 6: loss nan" in text and "learning rate" in text and "train.lr" in text, text[-3000:]
    assert "non-finite step 2, train.max_nonfinite_steps=1" in text, text[-3000:]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "fish_report.json").exists()
    assert verify(ckpt(out, 4)) is None and max(train_steps(out)) == 5  # the diverged step is not logged
    # 3. resume (falls back to step 4 again), SIGUSR1 to rank 1 at a random step, then resume to the end
    at = random.Random(time.time_ns()).randint(5, 10)
    proc = launch(2, ov, "zero2.json", expect_ok=False, env={**nan, "FISHDS_FAULT_SIGNAL": f"{at}:1:SIGUSR1"})
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and worker_exit(proc, EXIT_PREEMPTED), (at, proc.stderr[-3000:])
    assert f"stopped after step {at + 1} of 12" in text, (at, text[-3000:])  # seen at the next step's agreement
    assert (ckpt(out, at + 1) / "fishds_state.json").is_file() and verify(ckpt(out, at + 1)) is None
    assert not (out / "fish_report.json").exists()
    # 4. the final outputs cannot be written (rank 0, files over 1 KiB): exit code 74, nothing half-written, the
    # outputs of the start and the checkpoints as they were; the next run resumes and writes them
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"}
    proc = launch(2, ov, "zero2.json", expect_ok=False, env={**nan, "FISHDS_FAULT_FSIZE": "-1:0:1024"})
    assert proc.returncode != 0 and worker_exit(proc, EXIT_WRITE_FAILED), proc.stderr[-3000:]
    assert f"writing the outputs in {out}" in proc.stdout + proc.stderr
    assert not (out / "fish_report.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert not list(out.glob(".adapter.*")), "a temporary adapter folder was left"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "metrics.jsonl"} == before
    assert verify(ckpt(out, at + 1)) is None
    launch(2, ov, "zero2.json", env=nan)
    assert not marker.exists()
    assert_same_adapter(ref, out)
    assert train_steps(out) == list(range(1, 13))
    init, masks = load_file(str(out / "init_adapter_model.safetensors")), load_masks(out / "fish_mask.safetensors")
    last = adapter(out)
    for k, m in masks.items():
        assert torch.equal(last[k][~m], init[k][~m]), k


def test_preemption_during_the_fisher_pass_and_at_a_random_step_then_an_elastic_restart_zero3(toy, tmp_path):
    """ZeRO-3, fish.dense_steps=2, one output folder:
    1. SIGTERM to rank 1 after the last dense step (seen while the Fisher pass runs): the run stops once the mask
       is fixed, with a checkpoint at step 2 holding it (exit code 75);
    2. resume, SIGTERM to the torchrun launcher at a random step (torchrun forwards it to both workers): a
       checkpoint at the step the ranks agreed on;
    3. resume under torchrun --max-restarts 1, rank 1 SIGKILLed at step 10: the agent restarts both workers, which
       resume from the last complete checkpoint; the adapter equals the uninterrupted run's, bit for bit."""
    extra = {**STEPS, "fish.dense_steps": 2}
    ref, out = tmp_path / "ref", tmp_path / "run"
    ov = base_overrides(toy, out, **extra)
    launch(2, base_overrides(toy, ref, **extra), "zero3.json")
    # 1. during the Fisher pass
    proc = launch(2, ov, "zero3.json", expect_ok=False, env={"FISHDS_FAULT_SIGNAL": "2:1"})
    assert proc.returncode != 0 and worker_exit(proc, EXIT_PREEMPTED), proc.stderr[-3000:]
    assert "stopped after step 2 of 12" in proc.stdout + proc.stderr
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002"]
    masks_then = load_masks(ckpt(out, 2) / "fish_mask.safetensors")
    ref_masks = load_masks(ref / "fish_mask.safetensors")
    assert all(torch.equal(masks_then[k], ref_masks[k]) for k in ref_masks)
    # 2. a real SIGTERM to the launcher at a random step
    at = random.Random(time.time_ns()).randint(3, 7)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "sigterm.log"
    with open(log, "w") as f:
        p = subprocess.Popen(launch_command(2, ov, "zero3.json"), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while p.poll() is None and time.time() < deadline and max(train_steps(out), default=0) < at:
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before the signal"
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=120) != 0
    text = log.read_text()
    assert "preempted" in text, text[-3000:]
    stopped = max(train_steps(out))
    assert at <= stopped < 12, (at, stopped)
    assert (ckpt(out, stopped) / "fishds_state.json").is_file(), (at, stopped, text[-3000:])
    assert not (out / "fish_report.json").exists()
    # 3. an elastic restart after a SIGKILL
    kill_at = max(stopped + 1, 10)
    cmd = launch_command(2, ov, "zero3.json")
    cmd.insert(cmd.index("--standalone"), "--max-restarts=1")
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        # a restart shares torchrun's rendezvous store unless this is set, and may read the dead attempt's
        # addresses (pytorch/pytorch#135712): init_process_group then hangs
        env={**env, "FISHDS_FAULT_KILL": f"{kill_at}:1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("resumed from") == 2, proc.stdout[-4000:]  # the first attempt, then the restart
    assert_same_adapter(ref, out)
    assert train_steps(out) == train_steps(ref) == list(range(3, 13))  # steps 1-2: phase "dense"
    report = json.loads((out / "fish_report.json").read_text())
    assert report["selected"] == sum(int(m.sum()) for m in ref_masks.values())


@pytest.mark.parametrize("field", ["train.max_nonfinite_steps=-1"])
def test_max_nonfinite_steps_is_checked(field):
    from fishds.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="max_nonfinite_steps"):
        load_config(None, ["model.name_or_path=x", "data.path=y", "output_dir=z", field])


def test_resume_refuses_pickles_unless_trusted_and_skips_damaged_checkpoints(tmp_path, capsys):
    """Without world_state.safetensors only DeepSpeed's pickles could restore a checkpoint: refused, naming
    train.resume_trust_pickle; resume=auto passes over a checkpoint whose files changed after they were recorded;
    an explicit damaged path is refused naming the file."""
    from fishds.cache import seal
    from fishds.config import ConfigError
    from fishds.run.checkpoint import find_resume
    from fishds.run.reshard import TENSORS, check

    state = {"world_size": 2, "data_position": 3, "micro_batch_size": 3}
    with pytest.raises(ConfigError, match=r"train\.resume_trust_pickle=true"):
        check(state, tmp_path, 2, False, 3)
    check(state, tmp_path, 2, False, 3, trust_pickle=True)
    root = tmp_path / "out" / "checkpoints"
    for step in (2, 4):
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        torch.manual_seed(step)
        save_file({"a": torch.randn(64)}, str(folder / TENSORS))
        (folder / "fishds_state.json").write_text(json.dumps({"step": step, "files": seal(folder)["files"]}))
    assert find_resume("auto", tmp_path / "out") == root / "step-00000004"
    damaged = root / "step-00000004" / TENSORS
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF  # one bit pattern changed, same size: only the hash sees it
    damaged.write_bytes(bytes(raw))
    assert find_resume("auto", tmp_path / "out") == root / "step-00000002"
    assert "step-00000004 is damaged" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=f"{TENSORS} does not hold the bytes"):
        find_resume(str(root / "step-00000004"), tmp_path / "out")
    damaged.write_bytes(bytes(raw[:100]))
    assert "is 100 bytes" in verify(root / "step-00000004")


def test_legacy_world_state_pt_is_read_without_running_code(tmp_path):
    """world_state.pt of an older fishds: plain numbers load with the weights-only unpickler; a payload in it
    raises instead of running."""
    from fishds.run.reshard import _load_extra

    torch.save(
        {"optimizer_step": 4, "state_keys": ["exp_avg"], "lr": [0.01], "lr_scheduler": None},
        tmp_path / "world_state.pt",
    )
    assert _load_extra(tmp_path)["optimizer_step"] == 4
    marker = tmp_path / "payload-ran"
    (tmp_path / "world_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(pickle.UnpicklingError):
        _load_extra(tmp_path)
    assert not marker.exists()

"""A mask file always means masked training, the same in `fishds train` and in FishCallback, on 2 ranks each:
with a rule, exactly the file's entries train (every other entry of the saved adapter equals the adapter when the
mask was fixed); with fish.selection=dense (which trains every entry) a mask file contradicts the rule and both
clients refuse it before any weights load, with one line naming fish.selection and fish.mask_path."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import ROOT, base_overrides, launch
from safetensors.torch import load_file

from fishds.fish.mask import load_masks


def _hf_case(toy, out, *extra) -> subprocess.CompletedProcess:
    """tests/hf_case.py (a Trainer + FishCallback, DDP on 2 gloo ranks)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "tests/hf_case.py"]
    cmd += ["--model", toy["model"], "--train", toy["train"], "--out", str(out), *map(str, extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _trained_only_the_file(mask_file, adapter_dir, start_file) -> int:
    masks = load_masks(mask_file)
    final, start = load_file(str(adapter_dir / "adapter_model.safetensors")), load_file(str(start_file))
    assert sorted(masks) == sorted(final) == sorted(start)
    moved = 0
    for key, m in masks.items():
        assert torch.equal(final[key][~m], start[key][~m]), f"entries of {key} outside the mask file moved"
        moved += int((final[key][m] != start[key][m]).sum())
    selected = sum(int(m.sum()) for m in masks.values())
    assert 0 < selected < sum(m.numel() for m in masks.values()) and moved == selected, (moved, selected)
    return selected


def test_a_mask_file_trains_only_its_entries_in_both_clients(toy, tmp_path):
    first = tmp_path / "first"
    launch(1, base_overrides(toy, first, **{"fish.selection": "random"}))  # the mask file of an earlier run
    mask_file = first / "fish_mask.safetensors"

    cli = tmp_path / "cli"
    proc = launch(2, base_overrides(toy, cli, **{"fish.mask_path": mask_file}), "zero2.json")
    selected = _trained_only_the_file(mask_file, cli, cli / "init_adapter_model.safetensors")
    assert f"mask fixed: {selected:,}/" in proc.stdout

    hf = tmp_path / "hf"
    proc = _hf_case(toy, hf, "--mask_path", mask_file)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert _trained_only_the_file(mask_file, hf, hf / "start_adapter.safetensors") == selected
    assert f"FISH mask fixed at step 0: {selected:,}/" in proc.stdout


def test_dense_with_a_mask_file_is_refused_by_both_clients(toy, tmp_path):
    from fishds.fish.mask import save_masks

    mask_file = tmp_path / "fish_mask.safetensors"
    save_masks(mask_file, {"a": torch.tensor([True, False])})
    cli = tmp_path / "cli"
    overrides = base_overrides(toy, cli, **{"fish.selection": "dense", "fish.mask_path": mask_file})
    proc = launch(2, overrides, script="launch/train.py", expect_ok=False)
    errors = [line for line in proc.stderr.splitlines() if "fish.selection=dense" in line]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all("fish.mask_path=" in line for line in errors)
    assert not cli.exists()  # refused before preflight: nothing was loaded or written

    proc = _hf_case(toy, tmp_path / "hf", "--selection", "dense", "--mask_path", mask_file)
    errors = [line for line in proc.stderr.splitlines() if "FishError" in line and "selection=dense" in line]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert all("mask_path=" in line for line in errors)
    assert not (tmp_path / "hf").exists() and "[hf_case]" not in proc.stdout


def test_a_mask_file_with_dense_steps_is_refused_by_both_clients():
    """A mask file is used from the first step: dense steps before scoring do not apply (fishds train used to skip
    them and start masked training after them; FishCallback trained every step masked)."""
    import pytest

    from fishds.config import ConfigError, load_config
    from fishds.integrations.hf import FishCallback, FishError

    base = ["model.name_or_path=m", "data.path=d", "output_dir=o", "fish.mask_path=m.safetensors"]
    with pytest.raises(ConfigError, match=r"fish\.dense_steps=3"):
        load_config(None, base + ["fish.dense_steps=3"])
    with pytest.raises(FishError, match="dense_steps=3"):
        FishCallback(mask_path="m.safetensors", warmup_steps=3)
    assert load_config(None, base + ["fish.dense_steps=0"]).fish.dense_steps == 0
    assert FishCallback(mask_path="m.safetensors").warmup_steps is None

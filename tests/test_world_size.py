"""Changing the number of ranks between a checkpoint and its resume: the adapter, the fp32
masters, the optimizer moments and step and the LR schedule are saved whole (world_state.safetensors) and
re-partitioned, so 2 ranks -> 1 and 1 -> 2 continue the same run at ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file

from fishds.config import ConfigError
from fishds.fish.mask import load_masks
from fishds.run.checkpoint import complete_checkpoints

STEPS = {"train.max_steps": 8, "train.save_every": 4, "train.weight_decay": 0.1, "data.max_eval_examples": 4}


def train_losses(out) -> dict[int, float]:
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r.get("phase") == "train"
    }


@pytest.mark.parametrize(
    "ds, before, after", [("zero2.json", 2, 1), ("zero2.json", 1, 2), ("zero3.json", 2, 1), ("zero3.json", 1, 2)]
)
def test_resume_on_another_number_of_ranks(toy, tmp_path, ds, before, after):
    """The global batch stays 8 (micro 4 x ranks x grad_accum), so the resumed run must follow the uninterrupted one:
    same mask, masked entries at their initial values, losses and adapter as if nothing had changed."""
    ref, out = tmp_path / "ref", tmp_path / "resumed"
    accum = {1: 2, 2: 1}
    launch(before, base_overrides(toy, ref, **STEPS, **{"train.grad_accum": accum[before]}), ds)
    state = json.loads((ref / "checkpoints" / "step-00000004" / "fishds_state.json").read_text())
    assert state["world_size"] == before and state["zero_stage"] == int(ds[4])
    assert {"torch", "deepspeed", "transformers", "peft"} <= set(state["versions"])
    # the run as it was when the checkpoint at step 4 was complete: no final outputs, no later checkpoint
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("fish_report.json", "adapter_*", "probe_logits*"))
    metrics = [x for x in (out / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= 4]
    (out / "metrics.jsonl").write_text("".join(x + "\n" for x in metrics))
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000004"]
    launch(after, base_overrides(toy, out, **STEPS, **{"train.grad_accum": accum[after]}), ds)
    a, b = train_losses(ref), train_losses(out)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # the loss curve continues where it stopped
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5), (step, a, b)
    x, y = load_file(str(ref / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    for k in x:
        assert torch.allclose(x[k], y[k], atol=1e-5), k
    init = load_file(str(out / "init_adapter_model.safetensors"))
    masks = load_masks(out / "fish_mask.safetensors")
    assert all(torch.equal(masks[k], load_masks(ref / "fish_mask.safetensors")[k]) for k in masks)
    for k, m in masks.items():
        assert torch.equal(y[k][~m], init[k][~m]), f"masked entries of {k} moved after the re-partitioned resume"
    report = json.loads((out / "fish_report.json").read_text())
    assert report["selected"] == sum(int(m.sum()) for m in masks.values())


def test_refusals_name_both_world_sizes(tmp_path):
    from fishds.run.reshard import TENSORS, check

    state = {"world_size": 2, "data_position": 3, "micro_batch_size": 3}
    with pytest.raises(ConfigError, match=r"written on 2 rank\(s\), this run has 1.*fish\.compact_optimizer"):
        check(state, tmp_path, 1, True, 3)
    with pytest.raises(ConfigError, match=r"written on 2 rank\(s\), this run has 4.*world_state"):
        check(state, tmp_path, 4, False, 3)
    (tmp_path / TENSORS).write_bytes(b"")
    with pytest.raises(ConfigError, match=r"written on 2 rank\(s\), this run has 4.*train\.micro_batch_size"):
        check(state, tmp_path, 4, False, 3)  # 18 examples consumed: not whole micro-batches of 3 x 4 ranks
    check(state, tmp_path, 1, False, 3)  # 18 examples = 6 micro-batches of 3 on 1 rank
    check(state, tmp_path, 2, True, 3)  # same world size: nothing to re-partition

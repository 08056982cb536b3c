"""Budget protocols (counts computed by fishds), pool patterns, and the Pfeiffer bottleneck placement."""

from __future__ import annotations

import torch
from conftest import base_overrides, launch
from test_distributed import assert_mask_enforced, outputs

# toy LoRA on q (32x32) and v (32->16) in 2 layers: rank r has r*(32+32) + r*(32+16) = 112r entries per layer


def test_match_rank_masks_rank_4_down_to_the_count_of_rank_2(toy, tmp_path):
    out = tmp_path / "match"
    launch(1, base_overrides(toy, out, **{"fish.budget": "match_rank", "fish.match_r": 2, "fish.keep_ratio": "null"}))
    report = outputs(out)[3]
    b = report["budget"]
    assert b["baseline_r"] == 2 and b["baseline_trainable"] == 2 * 2 * 112 == b["k"] == b["trainable"]
    assert b["pool"] == b["dense_same_rank"] == 4 * 2 * 112
    assert_mask_enforced(out, 448)


def test_keep_ratio_reports_the_same_rank_and_smaller_rank_baselines(toy, tmp_path):
    out = tmp_path / "keep"
    launch(1, base_overrides(toy, out, **{"fish.keep_ratio": 0.5}))
    b = outputs(out)[3]["budget"]
    assert b == {
        "protocol": "keep_ratio",
        "pool": 896,
        "always_trained": 0,
        "dense_same_rank": 896,
        "baseline_r": 2,
        "baseline_trainable": 448,
        "k": 448,
        "trainable": 448,
    }


def test_excluded_tensors_train_fully_and_count_in_the_budget(toy, tmp_path):
    out = tmp_path / "exclude"
    launch(1, base_overrides(toy, out, **{"fish.pool_exclude": "[v_proj]", "train.weight_decay": 0.1}))
    adapter, init, masks, report = outputs(out)
    assert report["budget"]["pool"] == 512 and report["budget"]["always_trained"] == 384
    assert report["budget"]["k"] == 128 and report["budget"]["trainable"] == 512
    for key, m in masks.items():
        if "v_proj" in key:
            assert bool(m.all()) and not torch.equal(adapter[key], init[key]) or "lora_A" in key
    assert_mask_enforced(out, 128 + 384, bitwise_moved=False)


def test_pfeiffer_bottleneck_sits_after_the_mlp_only(toy, tmp_path):
    out = tmp_path / "pfeiffer"
    launch(1, base_overrides(toy, out, **{"peft.method": "bottleneck", "peft.placement": "pfeiffer"}))
    masks = outputs(out)[2]
    assert masks and all(".mlp.down_proj.bottleneck." in k for k in masks)


def test_head_trains_fully_and_counts_in_the_budget(toy, tmp_path):
    """FISH Mask's convention: the task head is always trainable and counted in the budget."""
    out = tmp_path / "head"
    ov = base_overrides(
        toy, out, **{"peft.modules_to_save": "[lm_head]", "fish.pool_exclude": "[lm_head]", "train.weight_decay": 0.1}
    )
    launch(2, ov, "zero3.json")
    adapter, init, masks, report = outputs(out)
    head = [k for k in masks if "lm_head" in k]
    assert head and all(bool(masks[k].all()) for k in head)
    head_numel = sum(masks[k].numel() for k in head)
    assert report["budget"]["always_trained"] == head_numel
    assert report["budget"]["trainable"] == report["budget"]["k"] + head_numel
    assert all(not torch.equal(adapter[k], init[k]) for k in head)
    assert_mask_enforced(out, report["budget"]["trainable"], bitwise_moved=False)

"""Selection rules through the real run (launch/train.py's path): a warm-up rule that keeps the warmed-up values
of unselected entries (fish.reset_unselected=false), and the head-only control of a classifier."""

from __future__ import annotations

import torch
from conftest import base_overrides, launch
from reference import initial_model
from safetensors.torch import load_file
from test_classification import _data
from test_distributed import assert_mask_enforced

from fishds.config import load_config
from fishds.fish.adapter import adapter_keys
from fishds.fish.mask import load_masks


def test_adam_v_module_keeps_warmed_up_unselected_entries_zero2(toy, tmp_path):
    """adam_v read from ZeRO-2's flat fp32 optimizer partition (movement and ZeRO-0/3 are in test_rules_dist)."""
    out = tmp_path / "adam_v"
    ov = base_overrides(
        toy,
        out,
        **{
            "fish.score": "adam_v",
            "fish.allocation": "module",
            "fish.dense_steps": 2,
            "fish.reset_unselected": "false",
            "train.weight_decay": 0.1,
        },
    )
    launch(2, ov, "zero2.json")
    _, masks, report = assert_mask_enforced(out, 224, bitwise_moved=False)
    assert report["selection"] == "adam_v/module" and report["reset_unselected"] is False
    assert report.get("collect_seconds", 0) == 0 and "passes_per_rank" not in report  # no scoring pass
    assert set(report["per_layer"]) == {"0", "1"} and sum(v["selected"] for v in report["per_layer"].values()) == 224
    assert {"lora_A", "lora_B"} <= set(report["coverage"])
    assert report["share"]["lora_A"] + report["share"]["lora_B"] == 1
    assert report["score_stats"]["max"] > 0 and report["score_stats"]["zeros"] < 896
    assert set(report["module_importance"]) == set(report["per_adapted_module"])
    assert abs(sum(report["module_importance"].values()) - 1) < 1e-9
    model = initial_model(load_config(None, ov))
    start = adapter_keys(model, {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    fixed = load_file(str(out / "init_adapter_model.safetensors"))
    kept = sum(int((fixed[k][~m] != start[k][~m]).sum()) for k, m in masks.items())
    assert kept > 0, "unselected entries keep their warmed-up values"


def test_head_only_trains_the_head_alone(toy, tmp_path):
    out = tmp_path / "head"
    ov = base_overrides(toy, out, **_data(toy), **{"fish.control": "head_only", "data.max_eval_examples": 32})
    launch(1, ov)
    head = sum(m.numel() for k, m in load_masks(out / "fish_mask.safetensors").items() if ".score." in k)
    adapter, masks, report = assert_mask_enforced(out, head)
    init = load_file(str(out / "init_adapter_model.safetensors"))
    assert report["k"] == 0 and report["selection"] == "head_only"
    assert report["budget"]["trainable"] == report["budget"]["always_trained"] == report["selected"] > 0
    for key, m in masks.items():
        if ".score." in key:
            assert bool(m.all()) and bool((adapter[key] != init[key]).all()), key
        else:
            assert not bool(m.any()) and torch.equal(adapter[key], init[key]), key

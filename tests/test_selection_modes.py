"""Selection modes and world-size invariance on real ranks: fisher, random, lowest, dense, and the warm-up reset."""

from __future__ import annotations

import torch
from conftest import base_overrides, launch
from reference import initial_model
from safetensors.torch import load_file
from test_distributed import assert_mask_enforced, outputs

from fishds.config import load_config
from fishds.fish.adapter import adapter_keys
from fishds.fish.mask import load_masks

POOL, B_ENTRIES = 896, 384  # toy: q (32x32) and v (16x32) in 2 layers, r=4


def assert_same_masks(a, b):
    ma, mb = load_masks(a / "fish_mask.safetensors"), load_masks(b / "fish_mask.safetensors")
    assert sorted(ma) == sorted(mb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k


def test_world_size_1_and_2_give_the_same_mask_bit_for_bit(toy, tmp_path):
    """keep_ratio 0.5 puts the boundary inside the exact zeros of lora_A (B=0 at init): ties by global order."""
    one, two = tmp_path / "one", tmp_path / "two"
    launch(1, base_overrides(toy, one, **{"fish.keep_ratio": 0.5}))
    launch(2, base_overrides(toy, two, **{"fish.keep_ratio": 0.5}), "zero3.json")
    assert_same_masks(one, two)
    _, _, masks, report = outputs(two)
    assert report["k"] == POOL // 2
    # Fisher memory: after the reduction each rank holds only its chunk of the scores (max over ranks)
    assert report["scores_held_entries"] <= -(-POOL // 2) and report["scores_held_bytes"] == 4 * (POOL // 2)
    assert report["accumulator_peak_bytes"] == 4 * POOL  # the full-pool fp32 accumulator, during the pass only
    assert report["grad_peak_bytes"] == 4 * POOL  # fp32 gradients of the pool in one pass
    assert report["share"]["lora_A"] == (POOL // 2 - B_ENTRIES) / (POOL // 2)
    first_a = min(k for k in masks if "lora_A" in k)  # the tie winners: lowest global index = first A tensor
    assert int(masks[first_a].sum()) == POOL // 2 - B_ENTRIES
    assert bool(masks[first_a].reshape(-1)[: POOL // 2 - B_ENTRIES].all())
    assert_mask_enforced(two, POOL // 2, bitwise_moved=False)


def test_random_mask_is_exact_seeded_and_world_size_free(toy, tmp_path):
    one, two, fisher = tmp_path / "one", tmp_path / "two", tmp_path / "fisher"
    launch(1, base_overrides(toy, one, **{"fish.selection": "random"}))
    launch(2, base_overrides(toy, two, **{"fish.selection": "random"}), "zero2.json")
    assert_same_masks(one, two)
    _, masks, report = assert_mask_enforced(two, 224, bitwise_moved=False)
    assert 0.2 < report["share"]["lora_A"] < 0.8, "a random mask spreads over A and B"
    launch(1, base_overrides(toy, fisher))
    assert report["share"]["lora_A"] != outputs(fisher)[3]["share"]["lora_A"]


def test_lowest_mask_takes_the_lowest_scores(toy, tmp_path):
    out = tmp_path / "lowest"
    ov = base_overrides(toy, out, **{"fish.selection": "lowest", "fish.save_scores": "true"})
    launch(1, ov)
    _, _, masks, report = outputs(out)
    scores = adapter_keys(initial_model(load_config(None, ov)), load_file(str(out / "fisher_scores.safetensors")))
    sel = torch.cat([scores[k][masks[k]] for k in masks])
    rest = torch.cat([scores[k][~masks[k]] for k in masks])
    assert sel.numel() == 224 and sel.max() <= rest.min()
    assert report["share"]["lora_A"] == 1.0  # the zero scores of A are the lowest


def test_dense_trains_every_entry(toy, tmp_path):
    out = tmp_path / "dense"
    launch(1, base_overrides(toy, out, **{"fish.selection": "dense", "train.weight_decay": 0.1}))
    _, masks, report = assert_mask_enforced(out, POOL, bitwise_moved=False)
    assert all(bool(m.all()) for m in masks.values())
    adapter = load_file(str(out / "adapter_model.safetensors"))
    init = load_file(str(out / "init_adapter_model.safetensors"))
    assert all(not torch.equal(adapter[k], init[k]) for k in adapter)


def test_warmup_resets_unselected_entries_under_zero3(toy, tmp_path):
    """Dense warm-up of 2 steps, then scoring: A now scores > 0; unselected entries go back to their initial values."""
    out = tmp_path / "warm"
    ov = base_overrides(toy, out, **{"fish.dense_steps": 2, "train.weight_decay": 0.1})
    launch(2, ov, "zero3.json")
    _, masks, report = assert_mask_enforced(out, 224, bitwise_moved=False)
    assert report["share"]["lora_A"] > 0
    start = adapter_keys(
        initial_model(load_config(None, ov)),
        {n: p.detach() for n, p in initial_model(load_config(None, ov)).named_parameters() if p.requires_grad},
    )
    fixed = load_file(str(out / "init_adapter_model.safetensors"))
    for k, m in masks.items():
        assert torch.equal(fixed[k][~m], start[k][~m]), f"unselected entries of {k} were not reset"
    moved_in_warmup = sum(int((fixed[k][m] != start[k][m]).sum()) for k, m in masks.items())
    assert moved_in_warmup > 0, "selected entries keep their warmed-up values"

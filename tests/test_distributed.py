"""FISH-LoRA on real DeepSpeed ranks (2 processes, gloo on CPU): the mask is exact, and masked entries never move."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import base_overrides, launch
from reference import initial_model, reference_mask, reference_scores
from safetensors.torch import load_file

from fishds.config import load_config
from fishds.fish.mask import load_masks


def adapter_file(out):
    """The saved adapter: PEFT's adapter_model.safetensors, or fishds' bottleneck_adapter.safetensors."""
    peft_file = out / "adapter_model.safetensors"
    return peft_file if peft_file.exists() else out / "bottleneck_adapter.safetensors"


def outputs(out):
    adapter = load_file(str(adapter_file(out)))
    init = load_file(str(out / "init_adapter_model.safetensors"))
    masks = load_masks(out / "fish_mask.safetensors")
    report = json.loads((out / "fish_report.json").read_text())
    return adapter, init, masks, report


def assert_mask_enforced(out, k: int, *, bitwise_moved: bool = True):
    """Every masked entry equals its value when the mask was fixed, exactly k are selected, selected ones moved."""
    adapter, init, masks, report = outputs(out)
    assert sorted(init) == sorted(masks)
    extra = set(adapter) - set(masks)  # only frozen buffers saved with the adapter (VeRA's projections)
    assert all(".vera_" in k for k in extra), extra
    assert sum(int(m.sum()) for m in masks.values()) == k == report["selected"]
    assert report["k"] == k - report.get("budget", {}).get("always_trained", 0)  # k counts the pool only
    moved = total_sel = 0
    for key, m in masks.items():
        assert adapter[key].shape == m.shape, key
        assert torch.equal(adapter[key][~m], init[key][~m]), f"masked entries of {key} moved"
        moved += int((adapter[key][m] != init[key][m]).sum())
        total_sel += int(m.sum())
    if bitwise_moved:
        assert moved == total_sel, f"only {moved} of {total_sel} selected entries moved"
    else:  # bf16: small updates can round away, but training must move some
        assert moved > total_sel // 2, f"only {moved} of {total_sel} selected entries moved"
    return adapter, masks, report


def assert_logits_reproduced(out, cfg_overrides, atol=1e-5):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = load_file(str(out / "probe_logits.safetensors"))
    cfg = load_config(None, cfg_overrides)
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32)
    if (out / "bottleneck_config.json").exists():
        from fishds.bottleneck import load_bottleneck

        model = load_bottleneck(base, out).eval()
    else:
        model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=atol, rtol=1e-4)


def assert_masks_at_one_bit(report, world: int, partitioned: bool):
    """memory_per_rank: masks <= 1.1 bits per entry on every rank; the enforcer's frozen fp32 values are counted
    apart (mask_restore_copies), 4 bytes per frozen entry of the rank's master partition."""
    entries = sum(t["numel"] for t in report["per_tensor"].values())
    mem = report["memory_per_rank"]
    assert len(mem) == world
    for m in mem:
        assert 0 < m["masks"] * 8 <= 1.1 * entries, (m["masks"], entries)
    frozen = entries - report["selected"]
    held = sum(m["mask_restore_copies"] for m in mem)
    assert held == 4 * frozen * (1 if partitioned else world), (held, frozen)


def test_zero3_two_ranks_matches_reference_fisher_and_freezes_masked(toy, tmp_path):
    """ZeRO-3, AdamW wd=0.1, clipping, accumulation 2: exact mask vs the paper's formula; masked entries fixed."""
    out = tmp_path / "z3"
    ov = base_overrides(
        toy,
        out,
        **{"train.weight_decay": 0.1, "train.grad_clip": 0.5, "train.grad_accum": 2, "fish.save_scores": "true"},
    )
    launch(2, ov, "zero3.json")
    adapter, masks, report = assert_mask_enforced(out, 224)
    assert report["zero_stage"] == 3 and report["world_size"] == 2
    assert not (out / "fish_mask_report.png").exists()  # train.report_png=false (tests/conftest.py)
    assert_masks_at_one_bit(report, 2, partitioned=True)
    cfg = load_config(None, ov)
    ref = reference_scores(cfg)
    got = load_file(str(out / "fisher_scores.safetensors"))
    for name, r in ref.items():
        torch.testing.assert_close(got[name], r, rtol=1e-5, atol=1e-12)
    flat = torch.cat([ref[n].reshape(-1) for n in sorted(ref)]).sort(descending=True).values
    assert flat[223] > flat[224] * (1 + 1e-3), "test data must leave a clear gap at the top-k boundary"
    ref_mask = reference_mask(ref, 224)
    from fishds.fish.adapter import adapter_keys

    keyed = adapter_keys(initial_model(cfg), ref_mask)
    for key in masks:
        assert torch.equal(masks[key], keyed[key]), key
    assert_logits_reproduced(out, ov)


@pytest.mark.parametrize(
    "ds_config,extra",
    [
        ("zero2.json", {"train.optimizer": "sgd", "train.momentum": 0.9, "train.weight_decay": 0.1, "train.lr": 0.05}),
        ("zero0.json", {"train.weight_decay": 0.1, "train.grad_accum": 2}),
    ],
)
def test_masked_entries_fixed_zero0_zero2(toy, tmp_path, ds_config, extra):
    out = tmp_path / ds_config
    ov = base_overrides(toy, out, **extra)
    launch(2, ov, ds_config)
    _, _, report = assert_mask_enforced(out, 224)
    assert_masks_at_one_bit(report, 2, partitioned=ds_config != "zero0.json")
    assert_logits_reproduced(out, ov)
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(train) == 4 and all(math.isfinite(r["loss"]) and 0 < r["grad_norm"] < 1e3 for r in train)
    assert all(r["tokens"] > 0 for r in train)


def test_optimizer_named_in_ds_json_zero1_bf16(toy, tmp_path):
    """An optimizer DeepSpeed builds from its JSON (AdamW, wd 0.1), ZeRO-1, bf16: masked bf16 weights bit-identical."""
    src = json.load(open("ds_configs/zero1.json"))
    src["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    path = tmp_path / "zero1_adamw.json"
    path.write_text(json.dumps(src))
    out = tmp_path / "z1"
    ov = base_overrides(toy, out, **{"train.weight_decay": 0.1, "train.precision": "bf16"})
    launch(2, ov, str(path))
    assert_mask_enforced(out, 224, bitwise_moved=False)


def test_zero0_bf16_one_process(toy, tmp_path):
    """ZeRO-0 in bf16 (DeepSpeed's FP16_UnfusedOptimizer keeps fp32 copies): masked entries bit-identical, wd 0.1."""
    out = tmp_path / "z0bf16"
    ov = base_overrides(toy, out, **{"train.weight_decay": 0.1, "train.precision": "bf16"})
    launch(1, ov, "zero0.json")
    assert_mask_enforced(out, 224, bitwise_moved=False)

"""fishds plan: memory per rank from a model config alone, checked against measured per-rank bytes."""

from __future__ import annotations

import json

import pytest
from conftest import base_overrides, launch

from fishds.cli import main
from fishds.config import load_config
from fishds.plan import PRESETS, Setup, load_arch, plan


def test_presets_and_config_json(toy):
    a = load_arch(toy["model"])
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate) == (32, 2, 4, 2, 64)
    assert load_arch("llama-70b") is PRESETS["llama-70b"]
    with pytest.raises(ValueError, match="preset"):
        load_arch("no-such-model")


def test_plan_scales_as_the_stages_say():
    a = PRESETS["llama-7b"]
    one = plan(a, Setup(zero=3, world=1, r=16, keep_ratio=0.1))
    eight = plan(a, Setup(zero=3, world=8, r=16, keep_ratio=0.1))
    z2 = plan(a, Setup(zero=2, world=8, r=16, keep_ratio=0.1))
    q = plan(a, Setup(zero=3, world=1, r=16, keep_ratio=0.1, quant_bits=4))
    assert eight["frozen"] == pytest.approx(one["frozen"] / 8)  # ZeRO-3 shards the backbone
    assert z2["frozen"] == one["frozen"] and z2["gradients"] == pytest.approx(one["gradients"] / 8)
    assert 0.28 < q["frozen"] / one["frozen"] < 0.34  # 4 bits + fp32 absmax per 64 + 16-bit embeddings vs 16 bits
    assert one["adapter_entries"] == 32 * 16 * (4 * 4096 * 2 + 3 * (4096 + 11008))  # r (in + out) per projection
    assert one["activations_gc"] < one["activations"] / 5
    assert plan(a, Setup(r=16))["masks"] == 0 < one["masks"]


def test_plan_command(capsys):
    assert (
        main(
            ["plan", "llama-70b", "--zero", "3", "--world", "2", "--quant", "4", "--double_quant", "--micro_batch", "2"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "frozen weights" in text and "total (checkpointing)" in text
    assert main(["plan", "llama-7b", "--targets", "q_proj,nope"]) == 2


def test_plan_within_20_percent_of_measured_lora(toy, tmp_path):
    """Plain-weight LoRA+FISH, one process: the plan's model states (frozen + adapter + optimizer + masks)
    within 20% of the bytes measured on the engine after training (fish_report.json memory_per_rank)."""
    out = tmp_path / "one"
    ov = base_overrides(toy, out)
    launch(1, ov)
    cfg = load_config(None, ov)
    m = json.loads((out / "fish_report.json").read_text())["memory_per_rank"][0]
    est = plan(
        load_arch(toy["model"]),
        Setup(
            zero=0,
            world=1,
            precision="fp32",
            r=cfg.peft.r,
            targets=tuple(cfg.peft.target_modules),
            keep_ratio=cfg.fish.keep_ratio,
        ),
    )
    for key, mkey in (("frozen", "frozen"), ("adapter", "trainable"), ("optimizer", "optimizer"), ("masks", "masks")):
        assert abs(est[key] - m[mkey]) <= 0.2 * m[mkey], (key, est[key], m[mkey])
    assert abs(est["measurable"] - m["model_states"]) / m["model_states"] < 0.20


def test_plan_from_run_config(toy, tmp_path, capsys):
    """`fishds plan --config` plans the run a config describes (ZeRO stage from the DeepSpeed JSON, no weights)."""
    import yaml

    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": toy["model"]},
                "data": {"path": toy["train"]},
                "peft": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                "quant": {"bits": 4},
                "output_dir": str(tmp_path / "o"),
            }
        )
    )
    assert main(["plan", "--config", str(cfg_file), "--world", "2", "--ds_config", "ds_configs/zero3.json"]) == 0
    text = capsys.readouterr().out
    assert "ZeRO-3, 2 rank(s)" in text and "4-bit backbone" in text and "keep 0.5" in text
    assert main(["plan", "--config", str(cfg_file), "--set", "peft.method=ia3"]) == 2

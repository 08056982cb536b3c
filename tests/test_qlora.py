"""QLoRA + FISH: a 4-bit (bitsandbytes NF4/FP4) backbone on CPU, 2 ranks under ZeRO-3 and ZeRO-2, and one process.

Each run: exactly k selected, masked entries never move, the 4-bit backbone is sharded under ZeRO-3 (from the
per-rank bytes in fish_report.json), the adapter loads on the quantized base (reproducing the trained
model's logits) and on the unquantized base, and the memory plan matches the measured per-rank bytes.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file
from test_distributed import assert_mask_enforced

from fishds.config import ConfigError, load_config

K = 224  # keep 0.25 of the 896-entry pool (LoRA r=4 on q_proj, v_proj of the 2-layer toy)


def load_base(cfg, quantized: bool):
    from transformers import AutoModelForCausalLM

    from fishds import quant

    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    kw = quant.load_kwargs(cfg) if quantized else {}
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=dtype, **kw)
    quant.after_load(base)
    return base


def check_adapter_loads(out, ov, atol):
    """On the quantized base: the probe logits of the trained model. On the unquantized base: the same adapter."""
    from peft import PeftModel

    cfg = load_config(None, ov)
    probe = load_file(str(out / "probe_logits.safetensors"))
    saved = load_file(str(out / "adapter_model.safetensors"))
    for quantized in (True, False):
        model = PeftModel.from_pretrained(load_base(cfg, quantized), str(out), autocast_adapter_dtype=False).eval()
        import bitsandbytes as bnb

        n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert (n4 > 0) == quantized
        loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(saved)
        for key, value in saved.items():
            match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
            assert len(match) == 1 and torch.equal(match[0].to(value.dtype), value), key
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
        assert torch.isfinite(logits).all()
        if quantized:
            torch.testing.assert_close(logits, probe["logits"], atol=atol, rtol=1e-4)


def check_memory(out, world: int, stage: int, cfg):
    from fishds.plan import Setup, load_arch, plan

    report = json.loads((out / "fish_report.json").read_text())
    mem = report["memory_per_rank"]
    assert len(mem) == world
    for m in mem:
        assert m["zero_stage"] == stage and m["optimizer_state_allocated"]
        assert m["frozen_4bit_full"] > 0
        share = m["frozen_4bit"] / m["frozen_4bit_full"]
        if stage == 3:  # the 4-bit backbone is sharded: about 1/world per rank (partition padding aside)
            assert abs(share - 1 / world) < 0.02, share
            assert m["largest_gathered_param"] > 0
        else:
            assert share == 1.0
    est = plan(
        load_arch(cfg.model.name_or_path),
        Setup(
            zero=stage,
            world=world,
            quant_bits=4,
            double_quant=cfg.quant.double_quant,
            precision=cfg.train.precision,
            r=cfg.peft.r,
            targets=tuple(cfg.peft.target_modules),
            keep_ratio=cfg.fish.keep_ratio,
        ),
    )
    measured = max(m["model_states"] for m in mem)  # frozen + adapter + optimizer (masters, moments) + masks
    assert abs(est["measurable"] - measured) / measured < 0.20, (est["measurable"], measured)
    return mem


def test_qlora_fish_zero3_two_ranks_bf16(toy, tmp_path):
    """ZeRO-3, bf16, NF4 stored in bf16 (the default: compute dtype), AdamW wd 0.1: exact k, masked bf16
    entries bit-identical, the 4-bit backbone sharded across the ranks."""
    out = tmp_path / "z3"
    ov = base_overrides(toy, out, **{"quant.bits": 4, "train.precision": "bf16", "train.weight_decay": 0.1})
    proc = launch(2, ov, "zero3.json")
    assert "memory per rank" in proc.stdout and "50% on this rank" in proc.stdout
    assert_mask_enforced(out, K, bitwise_moved=False)
    check_memory(out, 2, 3, load_config(None, ov))
    check_adapter_loads(out, ov, atol=0.05)


def test_qlora_fish_zero2_two_ranks_uint8_storage(toy, tmp_path):
    """ZeRO-2, fp32, NF4 stored as uint8, SGD with momentum and wd 0.1."""
    out = tmp_path / "z2"
    ov = base_overrides(
        toy,
        out,
        **{
            "quant.bits": 4,
            "quant.storage_dtype": "uint8",
            "train.optimizer": "sgd",
            "train.weight_decay": 0.1,
            "train.lr": 0.05,
        },
    )
    launch(2, ov, "zero2.json")
    assert_mask_enforced(out, K)
    check_memory(out, 2, 2, load_config(None, ov))
    check_adapter_loads(out, ov, atol=1e-5)


def test_qlora_fish_single_process_fp4_double_quant(toy, tmp_path):
    """One process (ZeRO-0), fp32, FP4 with double quantization, AdamW wd 0.1."""
    out = tmp_path / "one"
    ov = base_overrides(
        toy, out, **{"quant.bits": 4, "quant.type": "fp4", "quant.double_quant": "true", "train.weight_decay": 0.1}
    )
    launch(1, ov)
    assert_mask_enforced(out, K)
    check_memory(out, 1, 0, load_config(None, ov))
    check_adapter_loads(out, ov, atol=1e-5)
    check_merge_and_evaluate(toy, out, tmp_path)


def check_merge_and_evaluate(toy, out, tmp_path):
    """fishds merge folds the QLoRA adapter into the dequantized 4-bit base (saying so): the merged plain model gives
    the trained quantized model's logits, closer than a merge into the unquantized base; fishds evaluate, loading
    the base in 4 bits as the run did, prints the run's eval loss."""
    from transformers import AutoModelForCausalLM

    from fishds.merge import merge_adapter

    probe = load_file(str(out / "probe_logits.safetensors"))
    lines = []
    merged = merge_adapter(toy["model"], out, tmp_path / "merged", log=lines.append)
    assert len(lines) == 1 and "dequantized fp4 base" in lines[0] and "4-bit rounding error" in lines[0]
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
    err = (logits - probe["logits"]).abs().max()
    assert err < 1e-3, err
    plain = tmp_path / "plain"  # the same adapter folded into the full-precision base: further from the trained model
    plain.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (plain / name).write_bytes((out / name).read_bytes())
    model = AutoModelForCausalLM.from_pretrained(str(merge_adapter(toy["model"], plain, tmp_path / "m2")))
    with torch.no_grad():
        far = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits - probe["logits"]
    assert far.abs().max() > 10 * err

    from fishds.run.evaluate import evaluate_adapter

    metrics, _ = evaluate_adapter(out, toy["eval"])
    want = json.loads((out / "fish_report.json").read_text())["eval"]["eval_loss"]
    assert abs(metrics["eval_loss"] - want) <= 1e-5 * max(1.0, want), (metrics["eval_loss"], want)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"peft.method": "loha"}, "peft.method='loha'"),
        ({"peft.method": "pissa"}, "peft.method='pissa'"),
        ({"train.precision": "bf16", "quant.storage_dtype": "fp32"}, "quant.storage_dtype=fp32"),
        ({"train.precision": "bf16", "quant.compute_dtype": "fp32"}, "quant.storage_dtype=fp32"),
    ],
)
def test_qlora_refused_in_preflight(toy, tmp_path, extra, needle):
    """Combinations measured to fail are refused before any weights load, naming the field to change."""
    from fishds.run.preflight import preflight

    cfg = load_config(None, base_overrides(toy, tmp_path / "x", **{"quant.bits": 4, **extra}))
    with pytest.raises(ConfigError, match=needle):
        preflight(cfg, None)


def test_qlora_dora_refused_under_zero3_only(toy, tmp_path):
    from fishds.run.preflight import preflight

    cfg = load_config(None, base_overrides(toy, tmp_path / "x", **{"quant.bits": 4, "peft.method": "dora"}))
    with pytest.raises(ConfigError, match="peft.method='dora'.*ZeRO-3"):
        preflight(cfg, "ds_configs/zero3.json")
    preflight(cfg, "ds_configs/zero2.json")


def test_quant_bits_values(toy, tmp_path):
    assert load_config(None, base_overrides(toy, tmp_path)).quant.bits is None
    with pytest.raises(ConfigError, match="quant.bits"):
        load_config(None, base_overrides(toy, tmp_path, **{"quant.bits": 8}))

"""Stock DeepSpeed JSONs (the shapes Axolotl and LLaMA-Factory users copy) work unchanged: every "auto" the
Hugging Face integration fills is filled, anything else is refused naming the key."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, base_overrides, launch

from fishds.config import ConfigError, load_config
from fishds.dsconfig import resolve_ds_config

DATA = ROOT / "tests" / "data"
Z2, Z3 = DATA / "llamafactory_ds_z2_config.json", DATA / "axolotl_zero3_bf16.json"


def test_autos_filled_like_the_hf_integration(toy, tmp_path):
    cfg = load_config(None, base_overrides(toy, tmp_path, **{"train.lr_warmup_steps": 2, "train.weight_decay": 0.1}))
    hidden = json.loads((ROOT / toy["model"] / "config.json").read_text())["hidden_size"]
    z3 = resolve_ds_config(cfg, str(Z3), 2, toy["model"])
    zo = z3["zero_optimization"]
    assert zo["reduce_bucket_size"] == hidden**2 and zo["stage3_prefetch_bucket_size"] == int(0.9 * hidden**2)
    assert zo["stage3_param_persistence_threshold"] == 10 * hidden
    assert z3["fp16"]["enabled"] is False and z3["bf16"]["enabled"] is False and z3["train_batch_size"] == 8
    assert z3["gradient_clipping"] == 1.0 and z3["gradient_accumulation_steps"] == 1
    z2 = resolve_ds_config(cfg, str(Z2), 2, toy["model"])
    assert z2["optimizer"]["params"] == {
        "lr": 0.01,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "torch_adam": True,
    }
    assert z2["zero_optimization"]["round_robin_gradients"] is False  # DeepSpeed maps masters wrongly with it
    assert z2["scheduler"]["params"] == {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": 0.01,
        "warmup_num_steps": 2,
        "total_num_steps": 4,
        "warmup_type": "linear",
    }
    assert '"auto"' not in json.dumps(z2) + json.dumps(z3)


@pytest.mark.parametrize(
    "edit, named",
    [
        (
            lambda d: d["zero_optimization"].update(stage3_max_live_parameters="auto"),
            "zero_optimization.stage3_max_live_parameters",
        ),
        (lambda d: d["scheduler"].update(type="OneCycle"), "scheduler.type"),
        (lambda d: d["scheduler"].update(type="WarmupLR"), "train.scheduler"),
        (lambda d: d["scheduler"]["params"].update(total_num_steps=7), "total_num_steps"),
        (lambda d: d["optimizer"]["params"].update(lr=0.5), "train.lr"),
        (lambda d: d["fp16"].update(enabled=True), "fp16"),
    ],
)
def test_unfillable_or_contradicting_values_are_refused(toy, tmp_path, edit, named):
    cfg = load_config(None, base_overrides(toy, tmp_path))
    ds = json.loads(Z2.read_text())
    edit(ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        resolve_ds_config(cfg, str(path), 2, toy["model"])


def test_hidden_size_autos_need_a_model_config(toy, tmp_path):
    cfg = load_config(None, base_overrides(toy, tmp_path, **{"model.name_or_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        resolve_ds_config(cfg, str(Z3), 2, str(tmp_path))


@pytest.mark.parametrize("ds", [Z2, Z3], ids=["llamafactory-z2", "axolotl-z3"])
def test_stock_json_trains_on_2_ranks_with_exact_mask(toy, tmp_path, ds):
    from test_distributed import assert_logits_reproduced, assert_mask_enforced

    out = tmp_path / "run"
    ov = base_overrides(toy, out, **{"train.weight_decay": 0.1, "train.max_steps": 6})
    launch(2, ov, str(ds))
    _, masks, report = assert_mask_enforced(out, json.loads((out / "fish_report.json").read_text())["selected"])
    assert report["zero_stage"] == (2 if ds == Z2 else 3)
    assert_logits_reproduced(out, ov)
    written = json.loads((out / "ds_config.json").read_text())
    assert '"auto"' not in json.dumps(written)
    if ds == Z2:  # the JSON's WarmupDecayLR ran: up from 0 to train.lr (DeepSpeed warms up >= 2 steps), then down
        lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
        peak = lrs.index(max(lrs))
        assert lrs[0] == 0.0 and max(lrs) == pytest.approx(0.01) and 0 < peak < len(lrs) - 1, lrs
        assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :])), lrs

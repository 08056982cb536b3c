"""The GPU recipes (configs/recipes/): each validates as a Config, holds the settings a long GPU run needs, and
`fishds plan --config` fits an 80 GB GPU at its world size (from the shipped Llama-3 shapes, offline)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fishds.cli import main
from fishds.config import load_config
from fishds.plan import from_config, plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {  # recipe -> world size it is written for
    "llama3-8b-lora-8gpu.yaml": 8,
    "llama3-8b-qlora-8gpu.yaml": 8,
    "llama3-70b-qlora-2x8gpu.yaml": 16,
    "llama3-8b-qlora-1gpu.yaml": 1,
}
GIB = 2**30


def test_every_recipe_is_listed():
    assert sorted(p.name for p in (ROOT / "configs" / "recipes").glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_settings(name):
    cfg = load_config(ROOT / "configs" / "recipes" / name)
    t, d = cfg.train, cfg.data
    assert t.precision == "bf16" and t.gradient_checkpointing and t.save_every > 0
    assert d.max_length >= 4096 and d.packing and (d.eval_split > 0 or d.eval_path)
    assert not cfg.overwrite and cfg.resume == "auto"
    assert cfg.fish.selection == "random"  # the rule the measurements support (README "Does FISH help?")
    assert (ROOT / cfg.ds_config).is_file() and "gpu_zero" in cfg.ds_config
    assert ("70b" in name) == (cfg.ds_config.endswith("gpu_zero3.json"))
    assert ("qlora" in name) == (cfg.quant.bits == 4)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_plan_fits_80gb(name):
    cfg = load_config(ROOT / "configs" / "recipes" / name)
    arch, setup = from_config(cfg, None, RECIPES[name])
    assert arch.vocab == 128256 and arch.hidden in (4096, 8192)
    res = plan(arch, setup)
    assert res["total_gc"] < 80 * GIB and res["load_peak"] < 80 * GIB, (res["total_gc"] / GIB, res["load_peak"] / GIB)
    assert setup.zero == (3 if "70b" in name else 2) and setup.world == RECIPES[name]


def test_plan_config_prints_the_loss_path_by_impl(capsys):
    recipe = str(ROOT / "configs" / "recipes" / "llama3-8b-lora-8gpu.yaml")
    got = {}
    for impl in ("chunked", "full"):
        assert main(["plan", "--config", recipe, "--world", "8", "--set", f"train.loss_impl={impl}"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith(f"loss path ({impl})"))
        got[impl] = float(re.search(r"([\d.]+) GiB", line).group(1))
    # 4 x 4,096 tokens x 128,256 x (2 + 8) bytes for full; one 256-token chunk (+ the last position) for chunked
    assert got["full"] == pytest.approx(4 * 4096 * 128256 * 10 / GIB, rel=1e-3)
    assert got["chunked"] == pytest.approx((256 * 128256 * 14 + 4 * 128256 * 2) / GIB, rel=1e-3)

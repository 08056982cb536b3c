"""FISH over every PEFT method: exact k, masked entries never move, the adapter loads in peft and reproduces logits.

Each method runs twice: one process (ZeRO-0) and 2 ranks under ZeRO-3.
"""

from __future__ import annotations

import pytest
from conftest import base_overrides, launch
from test_distributed import assert_logits_reproduced, assert_mask_enforced, outputs

METHODS = ["dora", "rslora", "pissa", "olora", "ia3", "loha", "lokr", "vera", "bottleneck"]


@pytest.mark.parametrize("ranks,ds", [(1, None), (2, "zero3.json")], ids=["single", "zero3x2"])
@pytest.mark.parametrize("method", METHODS)
def test_method(toy, tmp_path, method, ranks, ds):
    out = tmp_path / method
    ov = base_overrides(toy, out, **{"peft.method": method, "train.weight_decay": 0.1, "fish.keep_ratio": 0.3})
    launch(ranks, ov, ds)
    _, _, masks, report = outputs(out)
    k = int(0.3 * report["pool_size"])
    assert_mask_enforced(out, k, bitwise_moved=False)
    assert report["method"] == method
    assert_logits_reproduced(out, ov, atol=1e-4)
    if method == "bottleneck":
        assert any(".o_proj.bottleneck.up." in key for key in masks), "houlsby places adapters after attention too"
    if method == "dora":
        mags = [key for key in masks if "magnitude" in key]
        assert mags, "DoRA's magnitude vectors belong to the pool"
        assert sum(int(masks[key].sum()) for key in mags) > 0, "and the Fisher top-k reaches them"

"""Same config, same seeds, run twice on 2 ranks (ZeRO-2, CPU): the same mask and the same adapter, bit for bit."""

from __future__ import annotations

import json

import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file

from fishds.fish.mask import load_masks


def test_same_config_twice_gives_identical_bits_zero2(toy, tmp_path):
    # adapter dropout on, so that the dropout RNG stream is part of what must repeat
    extra = {"peft.dropout": 0.1, "train.seed": 3, "fish.seed": 5}
    runs = [tmp_path / "run1", tmp_path / "run2"]
    for out in runs:
        launch(2, base_overrides(toy, out, **extra), "zero2.json")

    m1, m2 = (load_masks(out / "fish_mask.safetensors") for out in runs)
    assert sorted(m1) == sorted(m2)
    for key in m1:
        assert torch.equal(m1[key], m2[key]), f"mask of {key} differs between identical runs"

    for name in ("adapter_model.safetensors", "init_adapter_model.safetensors"):
        a1, a2 = (load_file(str(out / name)) for out in runs)
        assert sorted(a1) == sorted(a2), name
        for key in a1:
            assert a1[key].dtype == a2[key].dtype and torch.equal(a1[key], a2[key]), f"{name}: {key} differs"

    # the per-step losses and the eval figures repeat too (the seconds do not)
    def figures(out):
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]

    assert figures(runs[0]) == figures(runs[1])

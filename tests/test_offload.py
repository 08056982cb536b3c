"""ZeRO-Offload with FISH masks: offload_optimizer=cpu at ZeRO-2 and ZeRO-3 (DeepSpeedCPUAdam
keeps the fp32 masters and moments on the CPU) and offload_param=cpu at ZeRO-3, 2 ranks, masked entries bit-identical.

DeepSpeedCPUAdam is compiled the first time (about 100 s, cached in ~/.cache/torch_extensions): marked slow, out of
the fast tier (`pytest -m 'not slow'`), still run by `make test`."""

from __future__ import annotations

import json

import pytest
from conftest import base_overrides, launch


@pytest.mark.slow
@pytest.mark.parametrize("ds, stage", [("zero2_offload.json", 2), ("zero3_offload.json", 3)])
def test_cpu_offload_keeps_masked_entries_fixed(toy, tmp_path, ds, stage):
    from test_distributed import assert_logits_reproduced, assert_mask_enforced

    out = tmp_path / "run"
    ov = base_overrides(toy, out, **{"train.weight_decay": 0.1, "train.max_steps": 6})
    launch(2, ov, ds, timeout=1200)  # the first launch compiles DeepSpeedCPUAdam
    report = json.loads((out / "fish_report.json").read_text())
    assert report["zero_stage"] == stage
    assert_mask_enforced(out, report["selected"])
    assert_logits_reproduced(out, ov)
    written = json.loads((out / "ds_config.json").read_text())
    zo = written["zero_optimization"]
    assert zo["offload_optimizer"]["device"] == "cpu" and written["optimizer"]["type"] == "AdamW"
    assert "torch_adam" not in written["optimizer"]["params"]  # DeepSpeedCPUAdam, what ZeRO-Offload runs
    assert (zo.get("offload_param") or {}).get("device") == ("cpu" if stage == 3 else None)

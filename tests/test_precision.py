"""train.precision=auto: bf16 where the GPU supports it, fp32 on CPU; quant.compute_dtype follows it. The recorded value
in fish_report.json is checked by the 2-rank run in test_checkpoints_best.py."""

from __future__ import annotations

import torch
from conftest import base_overrides

from fishds.config import load_config


def test_precision_auto_resolves_once(toy, tmp_path, monkeypatch):
    cfg = load_config(None, base_overrides(toy, tmp_path / "o"))
    assert cfg.train.precision == "fp32"  # no CUDA here
    from fishds import quant

    assert quant.compute_dtype(cfg) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = load_config(None, base_overrides(toy, tmp_path / "o"))
    assert cfg.train.precision == "bf16" and quant.compute_dtype(cfg) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert load_config(None, base_overrides(toy, tmp_path / "o")).train.precision == "fp32"
    assert (
        load_config(None, base_overrides(toy, tmp_path / "o", **{"train.precision": "bf16"})).train.precision == "bf16"
    )

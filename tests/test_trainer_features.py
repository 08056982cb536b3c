"""Trainer conveniences: gradient checkpointing (Fisher pass included), TensorBoard scalars, the mask text and the
mask picture (train.report_png, which tests/conftest.py turns off elsewhere)."""

from __future__ import annotations

from conftest import base_overrides, launch
from test_distributed import assert_logits_reproduced, assert_mask_enforced


def test_gradient_checkpointing_and_tensorboard(toy, tmp_path):
    out = tmp_path / "gc"
    extra = {"train.gradient_checkpointing": "true", "train.weight_decay": 0.1, "train.report_png": "true"}
    ov = base_overrides(toy, out, **extra)
    proc = launch(2, ov, "zero3.json")
    png = out / "fish_mask_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"mask report: {png}" in proc.stdout
    assert_mask_enforced(out, 224)
    assert_logits_reproduced(out, ov)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0}).Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert acc.Scalars("eval/eval_loss")
    assert "fish/mask/text_summary" in acc.Tags()["tensors"]

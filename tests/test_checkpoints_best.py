"""Checkpoints that can be shipped (a PEFT adapter + the mask in every checkpoint folder), the best checkpoint by an
eval metric and early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file

from fishds.config import ConfigError, load_config
from fishds.run.checkpoint import complete_checkpoints


def test_metric_direction_and_preflight_errors(toy, tmp_path):
    from fishds.run.best import check, higher_is_better

    assert not higher_is_better("eval_loss") and higher_is_better("eval_accuracy")
    assert higher_is_better("eval_token_acc") and not higher_is_better("eval_ppl")
    with pytest.raises(ConfigError, match="train.metric_for_best"):
        higher_is_better("eval_f1")
    cases = [
        ({"train.save_best": True}, "train.eval_every"),
        ({"train.save_best": True, "train.eval_every": 2, "train.save_every": 3}, "train.save_every"),
        (
            {"train.early_stopping_patience": 2, "train.eval_every": 2, "train.metric_for_best": "accuracy"},
            "train.metric_for_best",
        ),
        ({"train.early_stopping_patience": 2, "train.eval_every": 2, "data.eval_path": "null"}, "data.eval_path"),
    ]
    for extra, named in cases:
        cfg = load_config(None, base_overrides(toy, tmp_path / "o", **extra))
        with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
            check(cfg, bool(cfg.data.eval_path), False)
    check(
        load_config(
            None,
            base_overrides(
                toy, tmp_path / "o", **{"train.save_best": True, "train.eval_every": 2, "train.save_every": 4}
            ),
        ),
        True,
        False,
    )


def checkpoint_logits(toy, folder, probe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(toy["model"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits


def test_checkpoints_hold_adapters_best_is_kept_and_early_stopping(toy, tmp_path):
    """2 ranks, ZeRO-3, best by eval_token_acc (higher is better), which reaches a plateau on the toy data: every
    checkpoint holds a PEFT adapter whose logits match the engine's at that step, the best checkpoint survives
    keep_checkpoints=1, training stops after `patience` evaluations without improvement, output_dir holds the best
    adapter."""
    out = tmp_path / "run"
    ov = base_overrides(
        toy,
        out,
        **{
            "train.max_steps": 40,
            "train.lr": 0.3,
            "train.scheduler": "constant",
            "train.eval_every": 2,
            "train.save_every": 2,
            "train.keep_checkpoints": 1,
            "train.save_best": True,
            "train.early_stopping_patience": 2,
            "train.metric_for_best": "token_acc",
            "data.max_eval_examples": 8,
        },
    )
    launch(2, ov, "zero3.json")
    report = json.loads((out / "fish_report.json").read_text())
    assert report["precision"] == "fp32"
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    train_steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    values = {e["step"]: e["eval_token_acc"] for e in evals}
    best_step = min(values, key=lambda s: (-values[s], s))  # the first evaluation at the highest accuracy
    # early stopping: the run ends at the second evaluation in a row that is no better than the best before it
    stop = next(
        s for s in sorted(values) if sum(1 for t in sorted(values) if best_step < t <= s) >= 2 and s > best_step
    )
    assert train_steps[-1] == stop < 40, (values, train_steps[-1])
    assert report["best"]["stopped_early"] and report["best"]["step"] == best_step
    assert report["best"]["metric"] == "eval_token_acc" and best_step < stop
    assert report["best"]["value"] == pytest.approx(values[best_step])
    kept = [p.name for p in complete_checkpoints(out)]
    assert kept == [f"step-{best_step:08d}", f"step-{stop:08d}"], kept  # the best one is never pruned
    best_dir = out / "checkpoints" / f"step-{best_step:08d}"
    last_dir = out / "checkpoints" / f"step-{stop:08d}"
    for folder in (best_dir, last_dir):
        for name in ("adapter_model.safetensors", "adapter_config.json", "fish_mask.safetensors"):
            assert (folder / name).is_file(), folder / name
        state = json.loads((folder / "fishds_state.json").read_text())
        assert state["world_size"] == 2 and state["zero_stage"] == 3 and "deepspeed" in state["versions"]
    # the last checkpoint is the engine at the stopping step: its adapter reproduces the engine's logits
    probe = load_file(str(out / "probe_logits.safetensors"))
    assert torch.allclose(checkpoint_logits(toy, last_dir, probe), probe["logits"], atol=1e-5)
    # output_dir holds the best adapter, the last step's adapter is kept in output_dir/last
    best_adapter, out_adapter = (load_file(str(p / "adapter_model.safetensors")) for p in (best_dir, out))
    assert all(torch.equal(best_adapter[k], out_adapter[k]) for k in best_adapter)
    last = load_file(str(out / "last" / "adapter_model.safetensors"))
    ckpt_last = load_file(str(last_dir / "adapter_model.safetensors"))
    assert all(torch.equal(last[k], ckpt_last[k]) for k in last)
    assert any(not torch.equal(last[k], best_adapter[k]) for k in last)
    # the checkpoint's mask file is the output_dir's, keyed like the adapter
    from fishds.fish.mask import load_masks

    a, b = load_masks(best_dir / "fish_mask.safetensors"), load_masks(out / "fish_mask.safetensors")
    assert sorted(a) == sorted(b) == sorted(k for k in best_adapter) and all(torch.equal(a[k], b[k]) for k in a)

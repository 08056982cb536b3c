"""Supervised fine-tuning as practitioners expect it (issue 15): token-level loss averaging across accumulation and
ranks, packing with per-example attention isolation, epochs and schedules, truncation counts, chat options."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import base_overrides, launch


def _text_file(toy: dict, path: Path) -> Path:
    """The toy reviews as text rows: 3..10 words plus </s>, so examples differ in their number of target tokens."""
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()]
    path.write_text("".join(json.dumps({"text": r["input"]}) + "\n" for r in rows))
    return path


def _rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def test_token_level_loss_same_adapter_for_any_accumulation_and_ranks(toy, tmp_path):
    """The step's loss is the mean over all its target tokens: micro-batch 1 x accumulation 4, 4 x 1 on one rank and
    2 x 1, 1 x 2 on two ranks train the same adapter (SGD, no clipping: the gradient's scale shows)."""
    data = _text_file(toy, tmp_path / "text.jsonl")
    runs = {"1x4": (1, 1, 4), "4x1": (1, 4, 1), "2ranks_2x1": (2, 2, 1), "2ranks_1x2": (2, 1, 2)}
    adapters, losses = {}, {}
    for name, (ranks, mbs, ga) in runs.items():
        out = tmp_path / name
        launch(ranks, base_overrides(toy, out, **{
            "data.path": data, "data.format": "text", "data.eval_path": data, "fish.selection": "dense",
            "fish.keep_ratio": "null", "train.optimizer": "sgd", "train.lr": 0.5, "train.grad_clip": 0,
            "train.micro_batch_size": mbs, "train.grad_accum": ga, "train.max_steps": 3}))
        adapters[name] = load_file(str(out / "adapter_model.safetensors"))
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                        if '"phase"' in line]
    init = load_file(str(tmp_path / "4x1" / "init_adapter_model.safetensors"))
    ref = adapters["4x1"]
    assert _rel_diff(init, ref) > 1e-3, "the adapter did not move; the comparison would prove nothing"
    for name in runs:
        assert _rel_diff(adapters[name], ref) < 1e-4, name
        assert losses[name] == pytest.approx(losses["4x1"], rel=1e-5), name  # the logged loss: token-weighted mean


def test_loss_sum_matches_the_models_mean_loss():
    """loss_sum / targets is the model's own (transformers) causal-LM mean loss on one micro-batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fishds.loss import count_targets, loss_sum

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    ids = torch.randint(0, 50, (3, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, 6:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert count_targets(batch) == 3 * 8 - 3 - 3
    with torch.no_grad():
        assert float(loss_sum(model, batch) / count_targets(batch)) == pytest.approx(float(model(**batch).loss),
                                                                                     rel=1e-6)


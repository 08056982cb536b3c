"""Sequence classification on real DeepSpeed ranks: a decoder (toy Llama) and an encoder (toy BERT).

The head is trained in full and counted in the budget; the mask is exact; masked entries never move;
accuracy is reported for eval and test data; the saved adapter reproduces the logits.
"""

from __future__ import annotations

import json
import math

import torch
from conftest import base_overrides, launch
from safetensors.torch import load_file
from test_distributed import assert_mask_enforced
from toy import make_tiny_bert, write_classification


def _data(toy) -> dict:
    root = toy["root"]
    if not (root / "cls_train.jsonl").exists():
        write_classification(root / "cls_train.jsonl", 256, seed=0)
        write_classification(root / "cls_eval.jsonl", 32, seed=1)
        write_classification(root / "cls_test.jsonl", 24, seed=2)
    return {
        "data.format": "classification",
        "data.path": str(root / "cls_train.jsonl"),
        "data.eval_path": str(root / "cls_eval.jsonl"),
        "data.test_path": str(root / "cls_test.jsonl"),
    }


def _check(out, model_path: str, head: str):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    report = json.loads((out / "fish_report.json").read_text())
    adapter, masks, _ = assert_mask_enforced(out, report["selected"])
    init = load_file(str(out / "init_adapter_model.safetensors"))
    head_keys = [k for k in masks if f".{head}." in k]
    assert head_keys, sorted(masks)
    for k in head_keys:  # the head trains in full: every entry selected, every entry moved
        assert bool(masks[k].all()) and bool((adapter[k] != init[k]).all()), k
    head_size = sum(masks[k].numel() for k in head_keys)
    assert report["budget"]["always_trained"] == head_size
    assert report["selected"] == report["k"] + head_size
    assert report["labels"] == ["fresh", "rotten"]
    ev = report["eval"]
    assert ev["eval_examples"] == 32 and ev["test_examples"] == 24
    assert 0 <= ev["eval_accuracy"] <= 1 and 0 <= ev["test_accuracy"] <= 1
    probe = load_file(str(out / "probe_logits.safetensors"))
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    assert logits.shape == (4, 2)
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)
    return report


def _check_head_steps(out, head: str, head_steps: int, dense_steps: int, total: int, lr: float = 0.01) -> None:
    """fish.head_steps: steps 1..head_steps trained the head alone (every other trainable entry bit for bit at its start
    value, tests/dist_case.py FISHDS_CASE_START_ADAPTER), then the dense steps, then masked training; metrics.jsonl
    logs the phases, the LR schedule spans every step, the report records the head steps."""
    from test_distributed import outputs

    _, fixed, masks, report = outputs(out)  # fixed: the adapter when the mask was fixed
    assert (report["head_steps"], report["dense_steps"]) == (head_steps, dense_steps)
    assert f"after {head_steps} head-only steps" in (out / "README.md").read_text()  # the model card
    start = load_file(str(out / "start" / "init_adapter_model.safetensors"))
    assert sorted(start) == sorted(fixed)
    heads = [k for k in start if f".{head}." in k]
    assert heads and len(heads) < len(start)
    for k in start:
        if k in heads:  # the head trained in the head steps
            assert bool((fixed[k] != start[k]).all()), k
        elif dense_steps == 0:  # nothing else moved, weight decay included
            assert torch.equal(fixed[k], start[k]), f"{k} moved during the head steps"
        else:  # the unselected entries were reset to their values after the head steps: their start values
            assert torch.equal(fixed[k][~masks[k]], start[k][~masks[k]]), f"{k} moved during the head steps"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["phase"]) for r in rows if "phase" in r]
    phases = ["head"] * head_steps + ["dense"] * dense_steps
    assert steps == [(i, phases[i - 1] if i <= len(phases) else "train") for i in range(1, total + 1)], steps
    for r in rows:  # train.scheduler=linear over all `total` steps, no warm-up (the rate before each step)
        if "phase" in r:
            assert math.isclose(r["lr"], lr * (1 - (r["step"] - 1) / total), rel_tol=1e-6), r


def _bert(toy):
    root = toy["root"] / "bert"
    return make_tiny_bert(root) if not (root / "config.json").exists() else root


def test_decoder_classification_zero3(toy, tmp_path):
    """Toy Llama + classification head (score), ZeRO-3, AdamW weight decay 0.1, 2 ranks; 1 head step, 1 dense step
    (fish.head_steps, fish.dense_steps), then masked training. A SIGTERM to rank 1 during the head step stops the run
    once the mask is fixed, with a checkpoint at step 2 (as during dense steps); the same command then finishes it."""
    from test_cluster_faults import ckpt, worker_exit

    from fishds.run.checkpoint import verify
    from fishds.run.guard import EXIT_PREEMPTED

    out = tmp_path / "dec"
    ov = base_overrides(
        toy,
        out,
        **_data(toy),
        **{
            "train.weight_decay": 0.1,
            "data.max_eval_examples": 32,
            "data.max_test_examples": 24,
            "fish.head_steps": 1,
            "fish.dense_steps": 1,
        },
    )
    proc = launch(
        2, ov, "zero3.json", expect_ok=False, env={"FISHDS_CASE_START_ADAPTER": "1", "FISHDS_FAULT_SIGNAL": "1:1"}
    )
    assert proc.returncode != 0 and worker_exit(proc, EXIT_PREEMPTED), proc.stderr[-3000:]
    assert "stopped after step 2 of 4" in proc.stdout + proc.stderr
    assert verify(ckpt(out, 2)) is None and not (out / "fish_report.json").exists()
    launch(2, ov, "zero3.json")  # resume=auto: from step 2
    report = _check(out, toy["model"], "score")
    assert report["zero_stage"] == 3
    _check_head_steps(out, "score", head_steps=1, dense_steps=1, total=4)


def test_encoder_classification_match_rank_zero2(toy, tmp_path):
    """Toy BERT, LoRA r=4 on query/value masked to the trainable count of plain r=2 (head included), ZeRO-2; the first
    2 of the 4 steps train only the head (fish.head_steps), then the mask is scored (fish.dense_steps=0)."""
    bert = _bert(toy)
    out = tmp_path / "enc"
    ov = base_overrides(
        toy,
        out,
        **_data(toy),
        **{
            "model.name_or_path": str(bert),
            "peft.target_modules": "[query,value]",
            "fish.keep_ratio": "null",
            "fish.budget": "match_rank",
            "fish.match_r": 2,
            "fish.head_steps": 2,
            "train.weight_decay": 0.1,
            "data.max_eval_examples": 32,
            "data.max_test_examples": 24,
        },
    )
    launch(2, ov, "zero2.json", env={"FISHDS_CASE_START_ADAPTER": "1"})
    report = _check(out, str(bert), "classifier")
    _check_head_steps(out, "classifier", head_steps=2, dense_steps=0, total=4)
    b = report["budget"]
    assert b["trainable"] == b["baseline_trainable"] == report["selected"]
    # fishds merge folds the adapter and the trained head into a plain classification model
    from transformers import AutoModelForSequenceClassification

    from fishds.merge import merge_adapter

    merged = AutoModelForSequenceClassification.from_pretrained(merge_adapter(bert, out, tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "fresh", 1: "rotten"}
    probe = load_file(str(out / "probe_logits.safetensors"))
    with torch.no_grad():
        logits = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


def test_head_lr_trains_the_head_at_its_own_rate_zero2(toy, tmp_path):
    """train.head_lr puts the head in its own optimizer group at that rate (ZeRO-2, 2 ranks): with a vanishing head
    rate the head stays put while the adapter trains at train.lr, and masked entries stay fixed."""
    out = tmp_path / "head_lr"
    ov = base_overrides(
        toy,
        out,
        **_data(toy),
        **{
            "model.name_or_path": str(_bert(toy)),
            "peft.target_modules": "[query,value]",
            "train.head_lr": 1e-9,
            "data.max_eval_examples": 32,
            "data.max_test_examples": 24,
        },
    )
    launch(2, ov, "zero2.json")
    report = json.loads((out / "fish_report.json").read_text())
    adapter, masks, _ = assert_mask_enforced(out, report["selected"], bitwise_moved=False)
    init = load_file(str(out / "init_adapter_model.safetensors"))
    head = [k for k in masks if ".classifier." in k]
    assert head
    assert max(float((adapter[k] - init[k]).abs().max()) for k in head) < 1e-6
    lora = [k for k in masks if "lora_" in k and masks[k].any()]
    assert lora and min(float((adapter[k] - init[k])[masks[k]].abs().max()) for k in lora) > 1e-4


def test_head_lr_refusals(tmp_path):
    """train.head_lr without a head, or beside a DeepSpeed scheduler that sets one absolute rate, is refused."""
    import pytest

    from fishds.config import ConfigError, load_config
    from fishds.dsconfig import resolve_ds_config

    need = ["model.name_or_path=m", "data.path=d.jsonl", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"train\.head_lr=0\.001 applies to a classification head"):
        load_config(None, [*need, "data.format=alpaca", "train.head_lr=1e-3"])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {}}}))
    cfg = load_config(None, [*need, "data.format=classification", "train.head_lr=1e-3", "train.scheduler=constant"])
    with pytest.raises(ConfigError, match=r"scheduler\.type='WarmupLR'.*train\.head_lr=0\.001 would be ignored"):
        resolve_ds_config(cfg, str(ds), 1)
    cfg = load_config(None, [*need, "data.format=classification", "train.head_lr=1e-3", "train.scheduler=cosine"])
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupCosineLR", "params": {}}}))
    assert resolve_ds_config(cfg, str(ds), 1)["scheduler"]["type"] == "WarmupCosineLR"  # scales each group's rate

"""bench/compare.py: the protocol's statistics on synthetic rows, and the driver end to end on a toy classifier."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compare  # noqa: E402
from test_classification import _data  # noqa: E402
from toy import make_tiny_bert  # noqa: E402


def _rows(values: dict, lrs=(1e-3, 1e-2, 1e-1)) -> list[dict]:
    """values[arm][lr] = (eval per seed, test per seed)."""
    rows = []
    for arm, by_lr in values.items():
        for lr, (ev, te) in by_lr.items():
            for seed, (e, t) in enumerate(zip(ev, te)):
                base = {
                    "budget": "p1:4:2",
                    "selection": arm,
                    "score": arm,
                    "allocation": "global",
                    "trainable": 10,
                    "seed": seed,
                    "lr": lr,
                }
                rows += [
                    {**base, "split": "eval", "metric": "eval_accuracy", "value": e},
                    {**base, "split": "test", "metric": "test_accuracy", "value": t},
                ]
    return rows


def test_summary_chooses_on_eval_reports_test_with_paired_t_intervals():
    dense_t, rand_t = [0.70, 0.72, 0.71, 0.69, 0.73], [0.71, 0.70, 0.72, 0.70, 0.71]
    rule_t = [0.75, 0.74, 0.76, 0.73, 0.77]
    low = [0.5] * 5
    rows = _rows(
        {
            "dense": {1e-3: ([0.9] * 5, dense_t), 1e-2: ([0.8] * 5, low), 1e-1: ([0.7] * 5, low)},
            "random": {1e-3: ([0.7] * 5, low), 1e-2: ([0.9] * 5, rand_t), 1e-1: ([0.8] * 5, low)},
            "saliency/module@20": {1e-3: ([0.7] * 5, low), 1e-2: ([0.8] * 5, low), 1e-1: ([0.9] * 5, rule_t)},
        }
    )
    cells, table, warnings = compare.summarise(rows)
    by = {c["selection"]: c for c in cells}
    assert by["dense"]["lr"] == 1e-3 and by["random"]["lr"] == 1e-2 and by["saliency/module@20"]["lr"] == 1e-1
    assert by["saliency/module@20"]["mean"] == pytest.approx(statistics.mean(rule_t))  # test figures at that lr
    d = [a - b for a, b in zip(rule_t, dense_t)]
    half = 2.776 * statistics.stdev(d) / math.sqrt(5)  # t(0.975, 4 df)
    got = by["saliency/module@20"]["paired"]["dense"]
    assert got["n"] == 5 and got["mean"] == pytest.approx(statistics.mean(d))
    assert got["ci95"] == pytest.approx([statistics.mean(d) - half, statistics.mean(d) + half])
    assert set(by["saliency/module@20"]["paired"]) == {"dense", "random"} and set(by["dense"]["paired"]) == {"random"}
    assert any("dense: the chosen lr 0.001 is at the bottom" in w for w in warnings)
    assert any("saliency/module@20: the chosen lr 0.1 is at the top" in w for w in warnings)
    assert not any("random: the chosen" in w for w in warnings)
    assert not any("10 x plain" in w for w in warnings)  # 0.1 >= 10 x 0.001
    assert "Δ vs random" in table and f"{100 * statistics.mean(d):+.2f}" in table
    # screening: choose and report on eval only; a grid short of 10 x plain's rate is flagged
    rows = _rows(
        {
            "dense": {1e-2: ([0.9] * 5, low), 3e-2: ([0.8] * 5, low)},
            "random": {1e-2: ([0.7] * 5, low), 3e-2: ([0.85] * 5, low)},
        }
    )
    cells, _, warnings = compare.summarise([r for r in rows if r["split"] == "eval"], split="eval")
    assert {c["selection"]: c["mean"] for c in cells}["random"] == pytest.approx(0.85)
    assert any("below 10 x plain" in w for w in warnings)


def test_arm_names():
    assert compare.parse_arm("fisher_warmup", 20)["fish"] == {"fish.score": "fisher", "fish.allocation": "global"}
    spec = compare.parse_arm("snr/ab_balanced+random_matched@7", 20)
    assert spec["warmup"] == 7 and spec["fish"]["fish.control"] == "random_matched"
    assert compare.is_random_arm("saliency/module+random_matched@20") and compare.is_random_arm("random/tensor")
    assert not compare.is_random_arm("saliency/module@20")
    with pytest.raises(SystemExit, match="SCORE"):
        compare.parse_arm("best/layer", 20)


def test_arm_lrs_give_an_arm_its_own_grid():
    budgets = [compare.parse_budget("p1:16:4")]
    own = compare.parse_arm_lrs(["dense=3e-3,1e-2"])
    assert own == {"dense": [3e-3, 1e-2]}
    todo = compare.arms(budgets, [0, 1], [3e-2], ["dense", "random"], 100, 20, own)
    lrs = {(a["selection"], a["lr"]) for a in todo}
    assert lrs == {("dense", 3e-3), ("dense", 1e-2), ("random", 3e-2)} and len(todo) == 6
    for bad in ("dense", "dense=", "dense=fast"):
        with pytest.raises(SystemExit, match="ARM=LR"):
            compare.parse_arm_lrs([bad])
    with pytest.raises(SystemExit, match="does not list: fisher"):
        compare.arms(budgets, [0], [1e-2], ["dense"], 100, 20, {"fisher": [1e-2]})


def test_compare_driver_end_to_end_on_a_toy_classifier(toy, tmp_path):
    bert = toy["root"] / "bert"
    if not (bert / "config.json").exists():
        make_tiny_bert(bert)
    data = _data(toy)
    config = tmp_path / "toy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(bert)},
                "peft": {"method": "lora", "target_modules": ["query", "value"]},
                "fish": {"num_samples": 8},
                "data": {
                    "path": data["data.path"],
                    "format": "classification",
                    "eval_path": data["data.eval_path"],
                    "test_path": data["data.test_path"],
                    "max_length": 32,
                    "max_eval_examples": 32,
                },
                "train": {"max_steps": 4, "micro_batch_size": 8},
                "output_dir": str(tmp_path / "unused"),
            }
        )
    )
    results = tmp_path / "results"
    rc = compare.main(
        [
            "--config",
            str(config),
            "--task",
            "toy",
            "--seeds",
            "0",
            "1",
            "--lrs",
            "1e-3",
            "--budgets",
            "p1:4:2",
            "--arms",
            "dense",
            "random",
            "saliency/tensor@2",
            "--runs",
            str(tmp_path / "runs"),
            "--results",
            str(results),
        ]
    )
    assert rc == 0
    out = json.loads((results / "compare-toy.json").read_text())
    assert {r["split"] for r in out["rows"]} == {"eval", "test"} and len(out["rows"]) == 3 * 2 * 2
    for r in out["rows"]:  # the existing schema plus score and allocation
        assert {
            "task",
            "model",
            "method",
            "selection",
            "score",
            "allocation",
            "budget",
            "trainable",
            "seed",
            "lr",
            "split",
            "metric",
            "value",
            "seconds",
        } <= set(r)
    cells = {c["selection"]: c for c in out["cells"]}
    rule = cells["saliency/tensor@2"]
    assert rule["score"] == "saliency" and rule["allocation"] == "tensor" and rule["n"] == 2
    assert set(rule["paired"]) == {"dense", "random"} and rule["paired"]["dense"]["ci95"] is not None
    assert 0 < rule["mask"]["share"]["lora_A"] < 1 and set(rule["mask"]["per_layer"]) >= {"0", "1"}
    assert "lora_B" in rule["mask"]["coverage"]
    assert cells["dense"]["trainable"] == rule["trainable"]  # protocol 1: the same trainable count
    assert any("seeds; the protocol asks for >= 5" in w for w in out["warnings"])
    assert any("below 10 x plain" in w for w in out["warnings"])
    assert "Δ vs plain" in (results / "compare-toy.md").read_text()
    # paired seeds: the same head initialisation across arms for a seed, another one for another seed
    runs = tmp_path / "runs" / "toy"
    head = {
        name: {
            k: v for k, v in load_file(str(runs / name / "init_adapter_model.safetensors")).items() if "classifier" in k
        }
        for name in ("p1-4-2_dense_lr0.001_s0", "p1-4-2_random_lr0.001_s0", "p1-4-2_random_lr0.001_s1")
    }
    a, b, c = head.values()
    assert a and all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)

"""fishds compare (fishds/compare.py, bench/compare.py its shim): the protocol's statistics and --quick's verdict on
synthetic rows, its plan without a run, and the driver end to end on a toy classifier (the matrix, then --quick)."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_classification import _data
from toy import make_tiny_bert

from fishds import compare

VERDICT = re.compile(
    r"^verdict: (helps|no evidence|hurts): (\S+) vs plain LoRA r=(\d+): ([+-]\d+\.\d+) (\S+) "
    r"\[([+-]\d+\.\d+), ([+-]\d+\.\d+)\] 95% CI over (\d+) paired seeds; effects beyond \+-(\d+\.\d+) ruled out$"
)


def _rows(values: dict, lrs=(1e-3, 1e-2, 1e-1), metric: str = "accuracy") -> list[dict]:
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
                    {**base, "split": "eval", "metric": f"eval_{metric}", "value": e},
                    {**base, "split": "test", "metric": f"test_{metric}", "value": t},
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
    fisher = {"fish.score": "fisher", "fish.allocation": "global", "fish.selection": "fisher"}
    assert compare.parse_arm("fisher_warmup", 20)["fish"] == fisher
    assert compare.parse_arm("grad/rank", 20)["fish"] == {"fish.score": "grad", "fish.allocation": "rank"}
    spec = compare.parse_arm("snr/ab_balanced+random_matched@7", 20)
    assert spec["warmup"] == 7 and spec["fish"]["fish.control"] == "random_matched"
    assert compare.is_random_arm("saliency/module+random_matched@20") and compare.is_random_arm("random/tensor")
    assert not compare.is_random_arm("saliency/module@20")
    with pytest.raises(compare.CompareError, match="SCORE"):
        compare.parse_arm("best/layer", 20)


def test_arm_lrs_give_an_arm_its_own_grid():
    budgets = [compare.parse_budget("p1:16:4")]
    own = compare.parse_arm_lrs(["dense=3e-3,1e-2"])
    assert own == {"dense": [3e-3, 1e-2]}
    todo = compare.arms(budgets, [0, 1], [3e-2], ["dense", "random"], 100, 20, own)
    lrs = {(a["selection"], a["lr"]) for a in todo}
    assert lrs == {("dense", 3e-3), ("dense", 1e-2), ("random", 3e-2)} and len(todo) == 6
    for bad in ("dense", "dense=", "dense=fast"):
        with pytest.raises(compare.CompareError, match="ARM=LR"):
            compare.parse_arm_lrs([bad])
    with pytest.raises(compare.CompareError, match="does not list: fisher"):
        compare.arms(budgets, [0], [1e-2], ["dense"], 100, 20, {"fisher": [1e-2]})


def _verdict(rule_t, dense_t, random_t, metric="accuracy"):
    """A rule, plain PEFT and a random mask at one rate each: the verdict of the rule (fisher) on their test rows."""
    n = len(rule_t)
    rows = _rows(
        {
            "dense": {1e-3: ([0.5] * n, dense_t)},
            "random": {1e-3: ([0.5] * n, random_t)},
            "fisher": {1e-3: ([0.5] * n, rule_t)},
        },
        metric=metric,
    )
    cells, _, _ = compare.summarise(rows, grid_warnings=False)
    return compare.verdict(cells, "fisher", "plain LoRA r=2")


def test_quick_verdict_helps_hurts_no_evidence_and_the_equivalence_bound():
    dense = [0.70, 0.72, 0.71, 0.69, 0.73]
    up = [0.75, 0.76, 0.76, 0.73, 0.78]  # +4 to +5 points on every seed
    out = _verdict(up, dense, dense)
    m = VERDICT.match(out["line"])
    assert m and m.group(1) == "helps" and out["verdict"] == "helps", out["line"]
    assert m.group(2) == "fisher" and m.group(3) == "2" and m.group(5) == "points" and m.group(8) == "5"
    d = [a - b for a, b in zip(up, dense)]
    half = 2.776 * statistics.stdev(d) / math.sqrt(5)
    lo, hi = statistics.mean(d) - half, statistics.mean(d) + half
    assert out["ci95"] == pytest.approx([lo, hi]) and lo > 0
    assert out["bound"] == pytest.approx(max(abs(lo), abs(hi)))  # effects beyond the interval's far end
    assert float(m.group(9)) == pytest.approx(100 * max(abs(lo), abs(hi)), abs=0.006)
    assert float(m.group(4)) == pytest.approx(100 * statistics.mean(d), abs=0.006)
    assert (
        out["random_line"].startswith("fisher vs a random mask of the same count: +")
        and "(better)" in (out["random_line"])
    )
    down = [v - 0.05 for v in up]  # below plain on every seed: hurts, the bound is |lo|
    out = _verdict([v - 0.09 for v in up], dense, up)
    assert out["verdict"] == "hurts" and out["ci95"][1] < 0 and out["bound"] == pytest.approx(-out["ci95"][0])
    assert "(worse)" in out["random_line"]
    noisy = [0.74, 0.68, 0.72, 0.70, 0.72]  # differences +4 -4 +1 +1 -1: the CI spans 0
    out = _verdict(noisy, dense, down)
    assert out["verdict"] == "no evidence" and out["ci95"][0] < 0 < out["ci95"][1]
    assert VERDICT.match(out["line"]).group(1) == "no evidence"
    assert out["bound"] == pytest.approx(max(-out["ci95"][0], out["ci95"][1]))


def test_quick_verdict_on_a_loss_lower_is_better():
    dense = [2.10, 2.12, 2.08, 2.11, 2.09]
    lower = [v - 0.05 for v in dense[:4]] + [2.03]  # lower loss on every seed: helps
    out = _verdict(lower, dense, dense, metric="loss")
    m = VERDICT.match(out["line"])
    assert m and out["verdict"] == "helps" and out["ci95"][1] < 0 and m.group(5) == "loss", out["line"]
    assert float(m.group(4)) < 0 and float(m.group(9)) == pytest.approx(-out["ci95"][0], abs=1e-4)  # loss units
    assert "(better)" in out["random_line"]
    out = _verdict([v + 0.05 for v in dense], dense, dense, metric="loss")
    assert out["verdict"] == "hurts" and out["ci95"][0] > 0 and "(worse)" in out["random_line"]
    # a loss is chosen low on validation: the rate with the lowest mean validation loss
    rows = _rows({"dense": {1e-3: ([2.0] * 2, [2.0] * 2), 1e-2: ([1.5] * 2, [1.6] * 2)}}, metric="loss")
    cells, table, _ = compare.summarise(rows)
    assert cells[0]["lr"] == 1e-2 and cells[0]["mean"] == pytest.approx(1.6) and "1.6000 ± 0.0000" in table


def _quick_config(tmp_path, **sections) -> str:
    tree = {
        "model": {"name_or_path": "m"},
        "data": {"path": "train.jsonl", "eval_path": "eval.jsonl", "test_path": "test.jsonl", "format": "alpaca"},
        "peft": {"r": 16},
        "train": {"lr": 1e-3, "max_steps": 100},
        "output_dir": "o",
    }
    for name, values in sections.items():
        tree[name] = {**tree.get(name, {}), **values}
        tree[name] = {k: v for k, v in tree[name].items() if v is not None}
    path = tmp_path / f"q{len(list(tmp_path.glob('q*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _plan(*argv):
    return compare.plan(compare.parser().parse_args(list(argv)), repo=None)


def test_quick_plan_arms_from_the_fish_defaults_budget_seeds_and_rates(tmp_path, monkeypatch):
    from fishds.fish import config as fish_config
    from fishds.fish.rules import label

    p = _plan("--config", _quick_config(tmp_path), "--quick")
    rule = label(fish_config.FishSection())
    assert p.rule == rule == "fisher" and p.arms == ["dense", "random", rule]
    assert p.budget["name"] == "p1:16:4" and (p.pool_r, p.plain_r) == (16, 4)
    assert p.lrs == [1e-3, 3e-3] and p.screen_seeds == [0, 1] and p.seeds == [0, 1, 2, 3, 4]
    assert p.metric == "token_acc" and p.has_test and p.split == "test" and p.prefix == "quick"
    assert len(p.screen) == 3 * 2 * 2 and {a["lr"] for a in p.screen} == {1e-3, 3e-3}
    assert "data.test_path" not in p.screen_common and p.common["data.test_path"] == "test.jsonl"
    fisher = next(a for a in p.screen if a["selection"] == "fisher")["overrides"]
    assert fisher["fish.score"] == "fisher" and fisher["peft.r"] == 16 and fisher["fish.match_r"] == 4
    assert next(a for a in p.screen if a["selection"] == "dense")["overrides"]["peft.r"] == 4
    text = "\n".join(compare.describe(p))
    assert "plain LoRA r=4" in text and "20 dense steps" in text and "27 runs" in text
    # the rule is whatever the fish section defaults to; --budgets, --lrs, --arm-lrs and the seeds override
    real = fish_config.FishSection
    monkeypatch.setattr(
        fish_config, "FishSection", lambda **kw: real(**{"score": "saliency", "allocation": "module", **kw})
    )
    p = _plan(
        "--config",
        _quick_config(tmp_path, peft={"r": 8}),
        "--quick",
        "--budgets",
        "p2:8:0.25",
        "--lrs",
        "1e-2",
        "3e-2",
        "--arm-lrs",
        "dense=1e-3",
        "--screen-seeds",
        "0",
        "--seeds",
        "0",
        "1",
    )
    assert p.rule == "saliency/module" and p.arms == ["dense", "random", "saliency/module"]
    assert p.budget["name"] == "p2:8:0.25" and p.plain_r == 2 and p.seeds == [0, 1] and p.screen_seeds == [0]
    assert {a["selection"] for a in p.screen} == {"random", "saliency/module"} and len(p.screen) == 4  # dense: 1 rate
    rule = next(a for a in p.screen if a["selection"] == "saliency/module")["overrides"]
    assert (rule["fish.score"], rule["fish.allocation"], rule["fish.keep_ratio"]) == ("saliency", "module", 0.25)
    monkeypatch.undo()
    # results and runs: the checkout's bench/results and runs/compare inside it, else ./fishds-compare
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert compare.default_dirs() == (Path("fishds-compare/runs"), Path("fishds-compare"))
    assert compare.default_dirs(root) == (root / "runs" / "compare", root / "bench" / "results")  # bench/compare.py
    monkeypatch.chdir(root / "docs")
    assert compare.default_dirs() == (root / "runs" / "compare", root / "bench" / "results")
    monkeypatch.undo()
    p = _plan("--config", _quick_config(tmp_path, peft={"r": 2}, data={"test_path": None}), "--quick")
    assert p.budget["name"] == "p1:2:1" and not p.has_test and p.split == "eval"  # validation, said loudly
    assert p.out_root.name.endswith("-screen") and "VALIDATION" in "\n".join(compare.describe(p))


def test_the_arms_rule_replaces_the_configs_selection(tmp_path):
    """A config with its own fish.selection (random, as the recipes have) can be compared: every arm's rule gives way
    to the arm's (fish.selection set with the arm's score where it is a shorthand); an arm whose score is not a
    shorthand (grad) against a config's fish.selection is still refused, naming the arm."""
    from fishds.config import load_config

    cfg = _quick_config(tmp_path, fish={"selection": "random"})
    p = _plan("--config", cfg, "--quick")
    for arm in p.screen:
        fish = load_config(cfg, [f"{k}={v}" for k, v in arm["overrides"].items()]).fish
        want = {"dense": ("dense", None), "random": ("random", "random"), "fisher": ("fisher", "fisher")}
        assert (fish.selection, fish.score) == want[arm["selection"]], arm
    p = _plan("--config", cfg, "--arms", "dense", "fisher/row", "random/tensor", "--budgets", "p1:16:4")
    assert {a["selection"] for a in p.todo} == {"dense", "fisher/row", "random/tensor"}
    refused = "(?s)arm grad/rank at p1:16:4: .*fish.selection=random and fish.score=grad contradict"
    with pytest.raises(compare.CompareError, match=refused):
        _plan("--config", cfg, "--arms", "grad/rank", "--budgets", "p1:16:4")


def test_quick_refuses_bad_input_before_any_run(tmp_path, capsys):
    from fishds import cli

    good = _quick_config(tmp_path)
    for argv, needle in (
        ([], "the following arguments are required: --config"),
        (["--config", str(tmp_path / "missing.yaml")], "missing.yaml does not exist"),
        (["--config", _quick_config(tmp_path, data={"eval_path": None})], "needs data.eval_path"),
        (["--config", _quick_config(tmp_path, peft={"r": 1})], "needs peft.r >= 2"),
        (["--config", good, "--seeds", "0"], "at least 2 paired seeds"),
        (["--config", good, "--arms", "dense"], "drop --arms"),
        (["--config", good, "--budgets", "p1:16:4", "p1:8:2"], "one budget"),
        (["--config", good, "--budgets", "p1:16"], "use p1:R:r or p2:R:p"),
        (["--config", good, "--arm-lrs", "lowest=1e-3"], "does not run"),
        (["--config", good, "--metric", "accuracy"], "reports token_acc, loss, ppl"),
        (["--config", _quick_config(tmp_path, fish={"selection": "lowest"}), "--arms", "grad"], "drop --arms"),
    ):
        assert cli.main(["compare", "--quick", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        at = [i for i, line in enumerate(err) if line.startswith("fishds compare: error: ")]  # after argparse's usage
        assert at and needle in " ".join(err[at[0] :]), (argv, err)
    assert not (tmp_path / "fishds-compare").exists() and not list(tmp_path.glob("runs*"))
    # bench/compare.py: the same command from a checkout
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "compare.py"), "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "compare.py: error: config file" in proc.stderr, proc.stderr[-2000:]


def test_compare_driver_end_to_end_on_a_toy_classifier(toy, tmp_path, capsys):
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
    # fishds compare --quick on the same task: it reuses the matrix's finished runs of the same arm, rate and seed
    # (dense and random at 1e-3), so it adds the screen of dense's two rates and the default rule's two seeds
    from fishds import cli
    from fishds.fish.config import FishSection
    from fishds.fish.rules import label

    capsys.readouterr()
    argv = ["compare", "--config", str(config), "--quick", "--task", "toy", "--budgets", "p1:4:2", "--lrs", "1e-3"]
    argv += ["--arm-lrs", "dense=1e-3,1e-2", "--screen-seeds", "0", "--seeds", "0", "1"]
    argv += ["--runs", str(tmp_path / "runs"), "--results", str(results)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    first_run = next(i for i, line in enumerate(lines) if re.match(r"\[compare\] (screen|confirm) \d+/", line))
    wall = next(i for i, line in enumerate(lines) if "expected wall time:" in line)
    assert wall < first_run and re.search(r"expected wall time: 8 runs x \d+ s / 2 parallel = ", lines[wall])
    assert "measured on the first run" in lines[wall]
    assert any(line.startswith("[compare] arms: dense = plain LoRA r=2") for line in lines[:wall])
    rule = label(FishSection())
    m = VERDICT.match(lines[-1])
    assert m and m.group(2) == rule and m.group(3) == "2" and m.group(8) == "2", lines[-3:]
    assert lines[-2].startswith(f"{rule} vs a random mask of the same count: ")
    assert sum(1 for line in lines if re.match(r"\[compare\] (screen|confirm) \d+/8 ", line)) == 8
    quick = json.loads((results / "quick-toy.json").read_text())
    assert quick["verdict"]["line"] == lines[-1] and quick["meta"]["quick"] is True
    assert {c["selection"]: c["n"] for c in quick["cells"]} == {"dense": 2, "random": 2, rule: 2}
    assert {r["split"] for r in quick["screen"]["rows"]} == {"eval"} and len(quick["screen"]["rows"]) == 2
    assert {r["split"] for r in quick["rows"]} == {"eval", "test"}
    assert lines[-1] in (results / "quick-toy.md").read_text()


def test_paired_contrasts_t_distribution_and_holm():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from paired_contrasts import holm, t_quantile, t_two_sided_p

    assert t_quantile(0.95, 9) == pytest.approx(2.262157, abs=1e-5)  # Student t tables
    assert t_quantile(0.975, 9) == pytest.approx(2.685011, abs=1e-5)
    assert t_quantile(0.95, 1) == pytest.approx(12.706205, abs=1e-4)
    assert t_two_sided_p(2.262157, 9) == pytest.approx(0.05, abs=1e-6)
    # Holm: the smaller p against 0.05 / 2, then the other against 0.05; stops at the first non-rejection
    assert holm([0.01, 0.04]) == [(0.02, 0.975, True), (0.04, 0.95, True)]
    assert [r[2] for r in holm([0.03, 0.04])] == [False, False]
    assert [r[2] for r in holm([0.001, 0.2, 0.01])] == [True, False, True]


def test_paired_contrasts_of_a_loss_across_two_files(tmp_path):
    """Arms of two compare files paired by seed; a loss stays in its units (not x 100) with a column relative to the
    control's mean; files of different metrics are refused."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import paired_contrasts

    def write(name, task, metric, arms):
        rows = [
            {"selection": arm, "budget": "p1:4:1", "lr": 0.01, "split": "test", "seed": seed, "value": v}
            for arm, vals in arms.items()
            for seed, v in enumerate(vals)
        ]
        cells = [{"selection": arm, "budget": "p1:4:1", "lr": 0.01} for arm in arms]
        meta = {"task": task, "metric": metric, "split": "test"}
        (tmp_path / name).write_text(json.dumps({"meta": meta, "rows": rows, "cells": cells}))
        return str(tmp_path / name)

    a = write("a.json", "a", "loss", {"rule": [1.0, 1.1, 0.9], "dense": [2.0, 2.1, 2.0]})
    b = write("b.json", "b", "loss", {"dense": [2.0, 2.0, 2.2]})
    out = tmp_path / "c.md"
    paired_contrasts.main(
        ["--results", a, b, "--primary", "rule - dense", "--secondary", "rule - b:dense", "--out", str(out)]
    )
    text = out.read_text()
    assert "| dense | 0.01 | 2.0333 ± 0.0577 (2.0000–2.1000) | 3 |" in text, text
    # rule - dense: -1.0, -1.0, -1.1 -> mean -1.0333 (-50.82% of 2.0333); rule - b:dense: -1.0, -0.9, -1.3
    assert "| rule - dense | -1.0333 |" in text and "-50.82% [" in text, text
    assert "| rule - b:dense | -1.0667 |" in text, text
    c = write("c.json", "c", "accuracy", {"dense": [0.5, 0.6, 0.7]})
    with pytest.raises(SystemExit, match="different metrics"):
        paired_contrasts.main(["--results", a, c, "--primary", "rule - dense"])


def test_arm_labels_and_arm_set_give_one_arm_its_own_fields(tmp_path):
    """`ARM~LABEL` runs an arm a second time under another name; `--arm-set ARM:KEY=VALUE` sets config fields of that
    arm alone (here plain LoRA with and without a frozen lora_A, and grad/rank frozen, in one matrix)."""
    cfg = _quick_config(tmp_path, peft={"r": 64})
    argv = ["--config", cfg, "--budgets", "p1:64:1", "--seeds", "0", "1", "--lrs", "1e-2"]
    frozen = ["dense~frozen:fish.freeze=[lora_A]", "grad/rank~frozen:fish.freeze=[lora_A]"]
    p = _plan(*argv, "--arms", "dense", "dense~frozen", "grad/rank~frozen", "--arm-set", *frozen)
    by = {}
    for a in p.todo:
        by.setdefault(a["selection"], []).append(a["overrides"])
    assert list(by) == ["dense", "dense~frozen", "grad/rank~frozen"] and all(len(v) == 2 for v in by.values())
    assert all("fish.freeze" not in o and o["peft.r"] == 1 for o in by["dense"])
    assert all(o["fish.freeze"] == "[lora_A]" and o["peft.r"] == 1 for o in by["dense~frozen"])
    assert all(
        o["fish.freeze"] == "[lora_A]" and o["peft.r"] == 64 and o["fish.score"] == "grad"
        for o in by["grad/rank~frozen"]
    )
    assert compare.is_random_arm("random/row~frozen") and not compare.is_random_arm("dense~random")
    assert compare.parse_arm("grad/rank~frozen", 20)["fish"] == compare.parse_arm("grad/rank", 20)["fish"]
    for extra, needle in (
        (["--arms", "dense", "dense"], "lists an arm twice"),
        (["--arms", "dense", "--arm-set", "dense~x:fish.freeze=[lora_A]"], "--arm-set names arms that --arms"),
        (["--arms", "dense", "--arm-set", "dense:freeze"], "write ARM:SECTION.KEY=VALUE"),
        (["--arms", "dense~a/b"], "a ~LABEL is letters"),
        (["--arms", "dense~x", "--arm-set", "dense~x:train.micro_batch_size=0"], "arm dense~x at p1:64:1"),
    ):
        with pytest.raises(compare.CompareError, match=re.escape(needle)):
            _plan(*argv, *extra)
    with pytest.raises(compare.CompareError, match="--arm-set is for a matrix"):
        _plan("--config", cfg, "--quick", "--arm-set", "dense:fish.freeze=[lora_A]")

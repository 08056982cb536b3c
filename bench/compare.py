"""Does a FISH mask help on your task? Selection rules vs random masks vs plain PEFT, at matched budgets, as an
honest protocol: paired seeds, each arm's learning rate chosen on validation, paired differences with 95% CIs.

    python bench/compare.py --config configs/compare/rt-minilm.yaml [--seeds 0 1 2 3 4] [--lrs 3e-3 1e-2 3e-2 1e-1]
        [--arm-lrs dense=3e-3,1e-2 random=1e-2,3e-2]
        [--budgets p1:16:4 p2:8:0.25] [--arms fisher random dense saliency/module@20 ...] [--parallel 2]
        [--split eval|test] [key=value ...]

A thin driver over the real entry point (launch/train.py, one process per arm, OMP_NUM_THREADS=1,
`--parallel` arms at a time). The config is a normal fishds YAML with data.path, data.eval_path
(validation: picks the learning rate) and data.test_path (reported, never used for a choice); the
built-in tasks (`data.path: rotten_tomatoes | spam_assassin | first_names | ...`, fishds.assets.TASKS) are
expanded to their cached jsonl files.

Arms (`--arms`, names also used in the tables):
- `dense`: plain PEFT at the matched rank (plain LoRA at the same trainable count); `dense_pool`: plain PEFT at the
  pool's rank (upper reference, more trainable entries);
- `SCORE[/ALLOCATION][+CONTROL][@WARMUP]`: a selection rule (fish.score, fish.allocation, fish.control, and
  fish.dense_steps dense steps counted in train.max_steps), e.g. `fisher` (the paper: Fisher at init, global
  top-k), `fisher@20`, `saliency/module@20`, `adam_v/tensor@20`, `saliency/module+random_matched@20` (random
  entries with that rule's per-tensor counts), `random`, `random/tensor`, `lowest`;
- `random_b_only` (random entries of lora_B only), `head_only` (classification: the head alone);
- legacy names: `fisher_warmup` = `fisher@W` (W = --warmup).
Random arms (score random, or control random_matched / random_b_only) are the controls every rule is compared with.

Budgets (../shared/FISH_TUNING.md section 1):
- p1:R:r  protocol 1: rank R masked down to the trainable count of plain rank r (fish.budget=match_rank);
- p2:R:p  protocol 2: rank R at keep ratio p, against plain rank R*p.
Every arm uses peft.alpha = 2 x rank, the same steps, schedule and learning-rate grid, and the same seeds: train.seed
fixes the adapter's and the head's initialisation and the data order, fish.seed the scoring sample and random
masks, so seed i of every arm sees the same batches with the same head (paired seeds). For each (budget, arm) the
learning rate with the best mean validation metric over seeds is chosen; a warning is printed (and kept in the JSON)
when that choice sits at the edge of the grid, or when the grid does not reach 10 x plain PEFT's chosen rate.
With `--split test` (the default) the test metric at the chosen rate is reported: mean +- std over seeds, and per
arm the paired difference to plain PEFT and to every random arm (same seed, each arm at its own chosen rate) with a
95% t-interval over seeds. `--split eval` (screening) never reads the test metric: the table shows validation.

Writes bench/results/<prefix>-<task>.json ({"meta", "rows": one row per run and split (task, model, method,
selection, score, allocation, budget, trainable, seed, lr, split, metric, value, seconds), "cells": per arm the
chosen rate, the figures, the paired differences, the A/B share, per-layer allocation and row/column coverage of
its masks, "warnings"}), .md (the tables) and .png (figures per arm with every seed; validation curves).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fishds.config import load_config  # noqa: E402
from fishds.files import METRICS_FILE, REPORT_FILE  # noqa: E402

SELECTIONS = ("fisher", "random", "lowest", "dense", "fisher_warmup")  # the legacy arm names
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
    60: 2.000,
}  # Student t, two-sided 95%, by degrees of freedom


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (table; the next smaller tabulated df above 60
    is conservative)."""
    return T975[max(d for d in T975 if d <= df)] if df < 60 else 1.96 if df > 1000 else T975[60]


def parse_arm(name: str, warmup: int) -> dict:
    """An arm name -> its fish overrides (see the module docstring): a rule name of fishds/fish/rules.py's grammar
    (rules.parse), with @WARMUP, or dense_pool / fisher_warmup."""
    from fishds.fish import rules

    if name == "fisher_warmup":
        name = f"fisher@{warmup}"
    rest, _, w = name.partition("@")
    try:
        fields = rules.parse("dense" if rest == "dense_pool" else rest)
    except ValueError as e:
        raise SystemExit(
            f"compare: arm {name!r}: use SCORE[/ALLOCATION][+CONTROL][@WARMUP], or dense, dense_pool, "
            f"random_b_only, head_only, fisher_warmup ({e})"
        ) from None
    if w and not w.isdigit():
        raise SystemExit(f"compare: arm {name!r}: @WARMUP must be a number of dense steps, e.g. fisher@20")
    if "selection" in fields:
        return {"name": name, "score": "dense", "allocation": "-", "fish": {"fish.selection": "dense"}, "warmup": 0}
    control = fields["control"]
    if not rules.CONTROLS[control].runs_rule:  # a control that names itself: no rule, no warm-up
        score = fields["score"] if rules.CONTROLS[control].trains_pool else "-"
        fish = {"fish.score": fields["score"], "fish.control": control}
        return {"name": name, "score": score, "allocation": "-", "fish": fish, "warmup": 0}
    fish = {"fish.score": fields["score"], "fish.allocation": fields["allocation"]}
    if control != "none":
        fish["fish.control"] = control
    return {
        "name": name,
        "score": fields["score"],
        "allocation": fields["allocation"],
        "fish": fish,
        "warmup": int(w or 0),
    }


def is_random_arm(arm: str) -> bool:
    return arm.startswith("random") or "+random_matched" in arm


def task_files(cfg) -> dict[str, str]:
    """data.path / eval_path / test_path; the built-in task names become their cached jsonl splits."""
    d = cfg.data
    from fishds import assets

    if d.path in assets.TASKS:
        files = assets.TASKS[d.path]("classification" if d.format == "classification" else "alpaca")
        return {
            "data.path": str(files["train"]),
            "data.eval_path": str(files["validation"]),
            "data.test_path": str(files["test"]),
        }
    if not (d.eval_path and d.test_path):
        raise SystemExit(
            "compare: the config needs data.eval_path (validation, picks the learning rate) and "
            "data.test_path (reported)"
        )
    return {"data.path": d.path, "data.eval_path": d.eval_path, "data.test_path": d.test_path}


def parse_budget(spec: str) -> dict:
    kind, big, small = spec.split(":")
    if kind == "p1":
        return {
            "name": spec,
            "fish": {"peft.r": int(big), "fish.budget": "match_rank", "fish.match_r": int(small)},
            "dense": {"peft.r": int(small)},
            "pool": {"peft.r": int(big)},
        }
    if kind == "p2":
        plain = int(big) * float(small)
        if not plain.is_integer():
            raise SystemExit(f"compare: budget {spec}: rank {big} x keep {small} is not a whole rank")
        return {
            "name": spec,
            "fish": {"peft.r": int(big), "fish.keep_ratio": float(small)},
            "dense": {"peft.r": int(plain)},
            "pool": {"peft.r": int(big)},
        }
    raise SystemExit(f"compare: budget {spec!r}: use p1:R:r or p2:R:p")


def parse_arm_lrs(specs) -> dict[str, list[float]]:
    """`--arm-lrs ARM=LR,LR ...` -> {arm: [lr, ...]}: that arm's own grid (the others use --lrs)."""
    out = {}
    for spec in specs or []:
        arm, sep, grid = spec.partition("=")
        try:
            out[arm] = [float(x) for x in grid.split(",") if x]
        except ValueError:
            out[arm] = []
        if not sep or not out[arm]:
            raise SystemExit(f"compare: --arm-lrs {spec!r}: write ARM=LR[,LR...], e.g. dense=3e-3,1e-2")
    return out


def arms(budgets, seeds, lrs, names, steps: int, warmup: int, arm_lrs: dict | None = None) -> list[dict]:
    """Every run: budget x arm x learning rate (the arm's own grid from arm_lrs, else lrs) x seed."""
    out = []
    unknown = sorted(set(arm_lrs or {}) - set(names))
    if unknown:
        raise SystemExit(f"compare: --arm-lrs names arms that --arms does not list: {', '.join(unknown)}")
    for b in budgets:
        for name in names:
            spec = parse_arm(name, warmup)
            for lr in (arm_lrs or {}).get(name, lrs):
                for seed in seeds:
                    ov = dict(b["dense"] if name == "dense" else b["pool"] if name == "dense_pool" else b["fish"])
                    ov.update(spec["fish"])
                    ov.update(
                        {"train.seed": seed, "fish.seed": seed, "train.lr": lr, "peft.alpha": 2 * ov["peft.r"]}
                    )  # alpha/r = 2 in every arm: the same LoRA scaling
                    if spec["warmup"]:  # dense steps, then score: the same total steps as every arm
                        if spec["warmup"] >= steps:
                            raise SystemExit(
                                f"compare: arm {name}: dense steps {spec['warmup']} >= train.max_steps {steps}"
                            )
                        ov.update({"fish.dense_steps": spec["warmup"], "train.max_steps": steps})  # counted in it
                    out.append(
                        {
                            "budget": b["name"],
                            "selection": name,
                            "score": spec["score"],
                            "allocation": spec["allocation"],
                            "seed": seed,
                            "lr": lr,
                            "overrides": ov,
                        }
                    )
    return out


def run_arm(arm: dict, config: str, common: dict, out_root: Path, log_dir: Path) -> dict:
    tag = arm["selection"].replace("/", "-").replace("+", "-").replace("@", "-w")
    name = f"{arm['budget'].replace(':', '-')}_{tag}_lr{arm['lr']:g}_s{arm['seed']}"
    out = out_root / name
    if (out / REPORT_FILE).is_file():  # finished earlier: reuse (delete the folder to rerun)
        return {**arm, "name": name, "out": str(out), "seconds": json.loads((out / "arm.json").read_text())["seconds"]}
    ov = {**common, **{k: v for k, v in arm["overrides"].items()}, "output_dir": str(out), "overwrite": "true"}
    cmd = [
        sys.executable,
        str(ROOT / "launch/train.py"),
        "--config",
        config,
        "--ds_config",
        str(ROOT / "ds_configs/zero0.json"),
    ] + [f"{k}={v}" for k, v in ov.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"arm {name} failed ({proc.returncode}); see {log_dir / (name + '.log')}")
    (out / "arm.json").write_text(json.dumps({"seconds": seconds}))
    return {**arm, "name": name, "out": str(out), "seconds": seconds}


def rows_of(result: dict, task: str, model: str, method: str, metric: str, splits=("eval", "test")) -> list[dict]:
    out = Path(result["out"])
    report = json.loads((out / REPORT_FILE).read_text())
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    curve = [(r["step"], r[f"eval_{metric}"]) for r in records if f"eval_{metric}" in r]
    base = {
        "task": task,
        "model": model,
        "method": method,
        "selection": result["selection"],
        "score": result["score"],
        "allocation": result["allocation"],
        "budget": result["budget"],
        "trainable": report["budget"]["trainable"],
        "seed": result["seed"],
        "lr": result["lr"],
        "seconds": round(result["seconds"], 1),
    }
    return [
        {
            **base,
            "split": split,
            "metric": f"{split}_{metric}",
            "value": report["eval"][f"{split}_{metric}"],
            **({"curve": curve} if split == "eval" else {}),
        }
        for split in splits
    ]


def mask_of(result: dict) -> dict:
    """Where one run's mask landed (its fish_report.json): A/B share, per-layer counts, row/column coverage."""
    report = json.loads((Path(result["out"]) / REPORT_FILE).read_text())
    return {
        "share": report.get("share", {}),
        "per_layer": report.get("per_layer", {}),
        "coverage": {
            k: {"row_share": v["row_share"], "col_share": v["col_share"]} for k, v in report.get("coverage", {}).items()
        },
    }


def _mean_dicts(items: list[dict]) -> dict:
    """Element-wise mean of nested dicts of numbers (the mask statistics over seeds)."""
    out = {}
    for key in items[0] if items else []:
        vals = [d[key] for d in items if key in d]
        out[key] = _mean_dicts(vals) if isinstance(vals[0], dict) else statistics.mean(vals)
    return out


def paired(a: dict, b: dict) -> dict | None:
    """Paired difference a - b over the seeds both have: mean, std, n and the 95% t-interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"mean": mean, "std": 0.0, "n": len(d), "ci95": None}
    sd = statistics.stdev(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d))
    return {"mean": mean, "std": sd, "n": len(d), "ci95": [mean - half, mean + half]}


def summarise(rows: list[dict], masks: dict | None = None, split: str = "test") -> tuple[list[dict], str, list[str]]:
    """Per (budget, arm): the learning rate with the best mean validation metric, the `split` figures at that rate
    (per seed), paired differences to plain PEFT and to every random arm, the mask statistics; the markdown; the
    warnings (choice at the grid's edge, grid short of 10 x plain PEFT's rate, fewer than 5 seeds)."""
    masks = masks or {}
    cells, warnings = [], []
    grid = sorted({r["lr"] for r in rows})
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for sel in dict.fromkeys(r["selection"] for r in rows if r["budget"] == budget):
            mine = [r for r in rows if r["budget"] == budget and r["selection"] == sel]
            by_lr = {}
            for r in mine:
                by_lr.setdefault(r["lr"], {"eval": {}, "test": {}})[r["split"]][r["seed"]] = r["value"]
            lr = max(sorted(by_lr), key=lambda x: statistics.mean(by_lr[x]["eval"].values()))
            per_seed = by_lr[lr][split]
            vals = list(per_seed.values())
            cell = {
                "budget": budget,
                "selection": sel,
                "score": mine[0]["score"],
                "allocation": mine[0]["allocation"],
                "lr": lr,
                "grid": sorted(by_lr),
                "trainable": mine[0]["trainable"],
                "split": split,
                "n": len(vals),
                "mean": statistics.mean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "min": min(vals),
                "max": max(vals),
                "per_seed": per_seed,
                "eval_mean": statistics.mean(by_lr[lr]["eval"].values()),
                "eval_by_lr": {str(x): statistics.mean(v["eval"].values()) for x, v in sorted(by_lr.items())},
                "mask": _mean_dicts([masks[(budget, sel, lr, s)] for s in per_seed if (budget, sel, lr, s) in masks]),
            }
            if split == "test":  # the legacy field names
                cell.update(test_mean=cell["mean"], test_std=cell["std"], test_min=cell["min"], test_max=cell["max"])
            if len(by_lr) > 1 and lr in (min(by_lr), max(by_lr)):
                edge = "top" if lr == max(by_lr) else "bottom"
                warnings.append(
                    f"{budget} {sel}: the chosen lr {lr:g} is at the {edge} "
                    f"of the grid {sorted(by_lr)}; extend the grid"
                )
            if len(vals) < 5:
                warnings.append(f"{budget} {sel}: {len(vals)} seeds; the protocol asks for >= 5 paired seeds")
            cells.append(cell)
        dense = next((c for c in cells if c["budget"] == budget and c["selection"] == "dense"), None)
        if dense and max(grid) < 10 * dense["lr"]:
            warnings.append(
                f"{budget}: the grid's top {max(grid):g} is below 10 x plain PEFT's chosen lr "
                f"{dense['lr']:g}; sparse masks need larger rates (FISH_TUNING.md 6.4)"
            )
        controls = [c for c in cells if c["budget"] == budget and is_random_arm(c["selection"])]
        for c in (c for c in cells if c["budget"] == budget):
            refs = ([dense] if dense and c is not dense else []) + [r for r in controls if r is not c]
            c["paired"] = {r["selection"]: paired(c["per_seed"], r["per_seed"]) for r in refs}
    metric = rows[0]["metric"].split("_", 1)[1]

    def diff(d):
        if d is None:
            return "–"
        if d["ci95"] is None:
            return f"{100 * d['mean']:+.2f} (n={d['n']})"
        return f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"

    lines = [
        f"| budget | arm | score | allocation | trainable | lr (by validation) | {split} {metric}: mean ± std "
        f"(min–max) | seeds | lora_A share | Δ vs plain (95% CI) |",
        "|---" * 10 + "|",
    ]
    for c in cells:
        share = c["mask"].get("share", {}).get("lora_A")
        lines.append(
            f"| {c['budget']} | {c['selection']} | {c['score']} | {c['allocation']} | {c['trainable']:,} | "
            f"{c['lr']:g} | {100 * c['mean']:.2f} ± {100 * c['std']:.2f} ({100 * c['min']:.2f}–"
            f"{100 * c['max']:.2f}) | {c['n']} | {'–' if share is None else f'{share:.2f}'} | "
            f"{diff(c['paired'].get('dense'))} |"
        )
    randoms = list(dict.fromkeys(c["selection"] for c in cells if is_random_arm(c["selection"])))
    if randoms:
        lines += [
            "",
            f"Paired {split} differences to each random arm (points, mean [95% CI], same seeds):",
            "",
            "| budget | arm | " + " | ".join(f"Δ vs {r}" for r in randoms) + " |",
            "|---|---|" + "---|" * len(randoms),
        ]
        for c in cells:
            lines.append(
                f"| {c['budget']} | {c['selection']} | "
                + " | ".join(diff(c["paired"].get(r)) if r != c["selection"] else "–" for r in randoms)
                + " |"
            )
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return cells, "\n".join(lines) + "\n", warnings


def plot(rows: list[dict], cells: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(c["budget"] for c in cells))
    SELECTIONS = list(dict.fromkeys(c["selection"] for c in cells))  # noqa: N806 (the arms, in run order)
    fig, axes = plt.subplots(1, 1 + len(budgets), figsize=(5 * (1 + len(budgets)), 4))
    ax = axes[0]
    for bi, budget in enumerate(budgets):
        for si, sel in enumerate(SELECTIONS):
            c = next((c for c in cells if c["budget"] == budget and c["selection"] == sel), None)
            if c is None:
                continue
            x = bi * (len(SELECTIONS) + 1) + si
            tests = list(c["per_seed"].values())
            ax.scatter([x] * len(tests), [100 * v for v in tests], color=f"C{si % 10}", s=12, alpha=0.6)
            ax.errorbar(
                [x],
                [100 * c["mean"]],
                yerr=[100 * c["std"]],
                fmt="o",
                color=f"C{si % 10}",
                label=sel if bi == 0 else None,
                capsize=4,
            )
    ax.set_xticks([bi * (len(SELECTIONS) + 1) + 1.5 for bi in range(len(budgets))], budgets)
    ax.set_ylabel(f"{cells[0]['split']} {rows[0]['metric'].split('_', 1)[1]} (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    for ax, budget in zip(axes[1:], budgets):
        for si, sel in enumerate(SELECTIONS):
            c = next((c for c in cells if c["budget"] == budget and c["selection"] == sel), None)
            curves = [
                r["curve"]
                for r in rows
                if c and r["budget"] == budget and r["selection"] == sel and r["lr"] == c["lr"] and r["split"] == "eval"
            ]
            if not curves or not curves[0]:
                continue
            steps = [s for s, _ in curves[0]]
            mean = [100 * statistics.mean(cv[i][1] for cv in curves) for i in range(len(steps))]
            ax.plot(steps, mean, label=sel, color=f"C{si % 10}")
        ax.set_title(f"{budget}: validation curve (mean over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--task", help="name in the output files (default: the config file's stem)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument(
        "--arm-lrs",
        nargs="+",
        default=[],
        metavar="ARM=LR,LR",
        help="an arm's own learning-rate grid (e.g. dense=3e-3,1e-2 after a screen); the other arms use --lrs",
    )
    ap.add_argument("--budgets", nargs="+", default=["p1:16:4", "p2:8:0.25"])
    ap.add_argument(
        "--arms",
        "--selections",
        dest="arms",
        nargs="+",
        default=list(SELECTIONS),
        help="arm names (see the module docstring): dense, fisher, random, saliency/module@20, ...",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="fisher_warmup: dense steps before scoring (taken "
        "out of train.max_steps, so every arm trains the same number of steps)",
    )
    ap.add_argument(
        "--split",
        choices=("test", "eval"),
        default="test",
        help="what the tables report: test (confirmation) or eval (screening: the test data is not even evaluated)",
    )
    ap.add_argument(
        "--prefix", default=None, help="results file prefix (default: compare, or screen with --split eval)"
    )
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--runs", default=str(ROOT / "runs/compare"), help="where the arms' output_dirs go")
    ap.add_argument("--results", default=str(ROOT / "bench/results"))
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every arm")
    args = ap.parse_args(argv)
    task = args.task or Path(args.config).stem
    prefix = args.prefix or ("compare" if args.split == "test" else "screen")
    cfg = load_config(args.config, [o for o in args.overrides])
    files = task_files(cfg)
    if args.split == "eval":
        files.pop("data.test_path")  # screening never evaluates the test split
    common = {**dict(o.split("=", 1) for o in args.overrides), **files}
    metric = "accuracy" if cfg.data.format == "classification" else "token_acc"
    budgets = [parse_budget(b) for b in args.budgets]
    arm_lrs = parse_arm_lrs(args.arm_lrs)
    todo = arms(budgets, args.seeds, args.lrs, args.arms, cfg.train.max_steps, args.warmup, arm_lrs)
    out_root = Path(args.runs) / (task if args.split == "test" else f"{task}-screen")
    log_dir = out_root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[compare] {task}: {len(todo)} runs ({len(budgets)} budgets x {len(args.arms)} arms x "
        f"{len(args.lrs)} lrs{' (or their own grid)' if arm_lrs else ''} x {len(args.seeds)} seeds), "
        f"{args.parallel} at a time",
        flush=True,
    )
    t0 = time.time()
    results = []
    with futures.ThreadPoolExecutor(args.parallel) as pool:
        for i, res in enumerate(pool.map(lambda a: run_arm(a, args.config, common, out_root, log_dir), todo), 1):
            results.append(res)
            print(f"[compare] {i}/{len(todo)} {res['name']} {res['seconds']:.0f}s", flush=True)
    splits = ("eval", "test") if args.split == "test" else ("eval",)
    rows = [r for res in results for r in rows_of(res, task, cfg.model.name_or_path, cfg.peft.method, metric, splits)]
    masks = {(res["budget"], res["selection"], res["lr"], res["seed"]): mask_of(res) for res in results}
    cells, table, warnings = summarise(rows, masks, args.split)
    for w in warnings:
        print(f"[compare] warning: {w}", flush=True)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "task": task,
        "config": args.config,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "wall_seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),  # UTC day the matrix finished
        "cpu_count": os.cpu_count(),
        "parallel": args.parallel,
        "split": args.split,
        "seeds": args.seeds,
        "lrs": args.lrs,
        "arm_lrs": arm_lrs,
        "arms": args.arms,
        "run_seconds_median": statistics.median(r["seconds"] for r in results) if results else None,
    }
    stem = results_dir / f"{prefix}-{task}"
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows, "cells": cells, "warnings": warnings}, indent=1)
    )
    stem.with_suffix(".md").write_text(
        f"`{meta['command']}` ({meta['date']}, {meta['wall_seconds'] / 60:.1f} min wall, "
        f"{meta['cpu_count']} CPU cores, median {meta['run_seconds_median']:.0f} s "
        f"per run)\n\n" + table
    )
    try:
        plot(rows, cells, stem.with_suffix(".png"), f"{task} ({cfg.model.name_or_path})")
    except ImportError as e:
        print(f"[compare] no plot ({e})")
    print(table, flush=True)
    print(f"[compare] wrote {stem}.{{json,md,png}} in {meta['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

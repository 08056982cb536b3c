"""Does FISH help on your task? Fisher vs random vs lowest-Fisher masks vs plain PEFT, at matched budgets.

    python bench/compare.py --config configs/compare/rt-minilm.yaml [--seeds 0 1 2] [--lrs 3e-3 1e-2]
        [--budgets p1:16:4 p2:8:0.25] [--parallel 2] [key=value ...]

A thin driver over the real entry point (launch/train.py, one process per arm, OMP_NUM_THREADS=1,
`--parallel` arms at a time). The config is a normal fishds YAML with data.path, data.eval_path
(validation: picks the learning rate) and data.test_path (reported, never used for selection); the
built-in tasks `data.path: rotten_tomatoes | spam_assassin` are expanded to their cached jsonl files.

Selections: fisher, random, lowest (the paper's ablations), dense (plain PEFT at the matched rank) and
fisher_warmup (fisher scored after `--warmup` dense steps, unselected entries then reset; those steps come out
of train.max_steps). At LoRA's initialisation B = 0, so every lora_A entry scores exactly zero and a mask
scored there lands in B only (FISH_TUNING.md trap 1); fisher_warmup is the remedy the FISH Mask authors used.

Budgets (../shared/FISH_TUNING.md section 1):
- p1:R:r  protocol 1: rank R masked down to the trainable count of plain rank r (fish.budget=match_rank);
- p2:R:p  protocol 2: rank R at keep ratio p, against plain rank R*p.
Every arm uses peft.alpha = 2 x rank. Each budget runs selection fisher, random and lowest at rank R, and
dense = plain PEFT at the matched rank, so every arm trains the same number of entries (up to the rounding the
report shows). Every arm uses the same steps, seeds (adapter init, data order, Fisher sample) and learning-rate
grid; for each (budget, selection) the learning rate with the best mean validation metric over seeds is chosen, and
its test metric is reported.

Writes bench/results/compare-<task>.json ({"rows": [...]}, one row per run and split), .md (mean and
spread per cell) and .png (test metric per selection with seed spread; validation learning curves).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
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

SELECTIONS = ("fisher", "random", "lowest", "dense", "fisher_warmup")


def task_files(cfg) -> dict[str, str]:
    """data.path / eval_path / test_path; the built-in task names become their cached jsonl splits."""
    d = cfg.data
    if d.path in ("rotten_tomatoes", "spam_assassin"):
        from fishds import assets
        files = getattr(assets, d.path)("classification" if d.format == "classification" else "alpaca")
        return {"data.path": str(files["train"]), "data.eval_path": str(files["validation"]),
                "data.test_path": str(files["test"])}
    if not (d.eval_path and d.test_path):
        raise SystemExit("compare: the config needs data.eval_path (validation, picks the learning rate) and "
                         "data.test_path (reported)")
    return {"data.path": d.path, "data.eval_path": d.eval_path, "data.test_path": d.test_path}


def parse_budget(spec: str) -> dict:
    kind, big, small = spec.split(":")
    if kind == "p1":
        return {"name": spec, "fish": {"peft.r": int(big), "fish.budget": "match_rank", "fish.match_r": int(small)},
                "dense": {"peft.r": int(small)}}
    if kind == "p2":
        plain = int(big) * float(small)
        if not plain.is_integer():
            raise SystemExit(f"compare: budget {spec}: rank {big} x keep {small} is not a whole rank")
        return {"name": spec, "fish": {"peft.r": int(big), "fish.keep_ratio": float(small)},
                "dense": {"peft.r": int(plain)}}
    raise SystemExit(f"compare: budget {spec!r}: use p1:R:r or p2:R:p")


def arms(budgets, seeds, lrs, selections, steps: int, warmup: int) -> list[dict]:
    out = []
    for b in budgets:
        for sel in selections:
            for lr in lrs:
                for seed in seeds:
                    ov = dict(b["dense"] if sel == "dense" else b["fish"])
                    ov.update({"fish.selection": sel, "train.seed": seed, "fish.seed": seed, "train.lr": lr,
                               "peft.alpha": 2 * ov["peft.r"]})  # alpha/r = 2 in every arm: the same LoRA scaling
                    if sel == "fisher_warmup":  # dense warm-up, then score: the same total steps as every arm
                        ov.update({"fish.selection": "fisher", "fish.dense_steps": warmup,
                                   "train.max_steps": steps})  # the dense steps count in max_steps
                    out.append({"budget": b["name"], "selection": sel, "seed": seed, "lr": lr, "overrides": ov})
    return out


def run_arm(arm: dict, config: str, common: dict, out_root: Path, log_dir: Path) -> dict:
    name = f"{arm['budget'].replace(':', '-')}_{arm['selection']}_lr{arm['lr']:g}_s{arm['seed']}"
    out = out_root / name
    if (out / REPORT_FILE).is_file():  # finished earlier: reuse (delete the folder to rerun)
        return {**arm, "name": name, "out": str(out), "seconds": json.loads((out / "arm.json").read_text())["seconds"]}
    ov = {**common, **{k: v for k, v in arm["overrides"].items()}, "output_dir": str(out), "overwrite": "true"}
    cmd = [sys.executable, str(ROOT / "launch/train.py"), "--config", config,
           "--ds_config", str(ROOT / "ds_configs/zero0.json")] + [f"{k}={v}" for k, v in ov.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"arm {name} failed ({proc.returncode}); see {log_dir / (name + '.log')}")
    (out / "arm.json").write_text(json.dumps({"seconds": seconds}))
    return {**arm, "name": name, "out": str(out), "seconds": seconds}


def rows_of(result: dict, task: str, model: str, method: str, metric: str) -> list[dict]:
    out = Path(result["out"])
    report = json.loads((out / REPORT_FILE).read_text())
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    curve = [(r["step"], r[f"eval_{metric}"]) for r in records if f"eval_{metric}" in r]
    base = {"task": task, "model": model, "method": method, "selection": result["selection"],
            "budget": result["budget"], "trainable": report["budget"]["trainable"], "seed": result["seed"],
            "lr": result["lr"], "seconds": round(result["seconds"], 1)}
    return [{**base, "split": split, "metric": f"{split}_{metric}", "value": report["eval"][f"{split}_{metric}"],
             **({"curve": curve} if split == "eval" else {})} for split in ("eval", "test")]


def summarise(rows: list[dict]) -> tuple[list[dict], str]:
    """Per (budget, selection): the learning rate with the best mean validation metric, and its test scores."""
    cells = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for sel in SELECTIONS:
            mine = [r for r in rows if r["budget"] == budget and r["selection"] == sel]
            if not mine:
                continue
            by_lr = {}
            for r in mine:
                by_lr.setdefault(r["lr"], {"eval": [], "test": []})[r["split"]].append(r["value"])
            lr = max(by_lr, key=lambda x: statistics.mean(by_lr[x]["eval"]))
            test = by_lr[lr]["test"]
            cells.append({"budget": budget, "selection": sel, "lr": lr, "trainable": mine[0]["trainable"],
                          "n": len(test), "test_mean": statistics.mean(test),
                          "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                          "test_min": min(test), "test_max": max(test),
                          "eval_mean": statistics.mean(by_lr[lr]["eval"])})
    metric = rows[0]["metric"].split("_", 1)[1]
    lines = [f"| budget | selection | trainable | lr (by validation) | test {metric}: mean ± std (min–max) | seeds |",
             "|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['budget']} | {c['selection']} | {c['trainable']:,} | {c['lr']:g} | "
                     f"{100 * c['test_mean']:.2f} ± {100 * c['test_std']:.2f} ({100 * c['test_min']:.2f}–"
                     f"{100 * c['test_max']:.2f}) | {c['n']} |")
    return cells, "\n".join(lines) + "\n"


def plot(rows: list[dict], cells: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(c["budget"] for c in cells))
    fig, axes = plt.subplots(1, 1 + len(budgets), figsize=(5 * (1 + len(budgets)), 4))
    ax = axes[0]
    for bi, budget in enumerate(budgets):
        for si, sel in enumerate(SELECTIONS):
            c = next((c for c in cells if c["budget"] == budget and c["selection"] == sel), None)
            if c is None:
                continue
            x = bi * (len(SELECTIONS) + 1) + si
            tests = [r["value"] for r in rows if r["budget"] == budget and r["selection"] == sel
                     and r["lr"] == c["lr"] and r["split"] == "test"]
            ax.scatter([x] * len(tests), [100 * v for v in tests], color=f"C{si}", s=12, alpha=0.6)
            ax.errorbar([x], [100 * c["test_mean"]], yerr=[100 * c["test_std"]], fmt="o", color=f"C{si}",
                        label=sel if bi == 0 else None, capsize=4)
    ax.set_xticks([bi * (len(SELECTIONS) + 1) + 1.5 for bi in range(len(budgets))], budgets)
    ax.set_ylabel(f"test {rows[0]['metric'].split('_', 1)[1]} (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    for ax, budget in zip(axes[1:], budgets):
        for si, sel in enumerate(SELECTIONS):
            c = next((c for c in cells if c["budget"] == budget and c["selection"] == sel), None)
            curves = [r["curve"] for r in rows if c and r["budget"] == budget and r["selection"] == sel
                      and r["lr"] == c["lr"] and r["split"] == "eval"]
            if not curves or not curves[0]:
                continue
            steps = [s for s, _ in curves[0]]
            mean = [100 * statistics.mean(cv[i][1] for cv in curves) for i in range(len(steps))]
            ax.plot(steps, mean, label=sel, color=f"C{si}")
        ax.set_title(f"{budget}: validation curve (mean over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--task", help="name in the output files (default: the config file's stem)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    ap.add_argument("--budgets", nargs="+", default=["p1:16:4", "p2:8:0.25"])
    ap.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    ap.add_argument("--warmup", type=int, default=20, help="fisher_warmup: dense steps before scoring (taken "
                    "out of train.max_steps, so every arm trains the same number of steps)")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--runs", default=str(ROOT / "runs/compare"), help="where the arms' output_dirs go")
    ap.add_argument("--results", default=str(ROOT / "bench/results"))
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every arm")
    args = ap.parse_args(argv)
    task = args.task or Path(args.config).stem
    cfg = load_config(args.config, [o for o in args.overrides])
    common = {**dict(o.split("=", 1) for o in args.overrides), **task_files(cfg)}
    metric = "accuracy" if cfg.data.format == "classification" else "token_acc"
    budgets = [parse_budget(b) for b in args.budgets]
    todo = arms(budgets, args.seeds, args.lrs, args.selections, cfg.train.max_steps, args.warmup)
    out_root, log_dir = Path(args.runs) / task, Path(args.runs) / task / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"[compare] {task}: {len(todo)} arms ({len(budgets)} budgets x {len(args.selections)} selections x "
          f"{len(args.lrs)} lrs x {len(args.seeds)} seeds), {args.parallel} at a time", flush=True)
    t0 = time.time()
    results = []
    with futures.ThreadPoolExecutor(args.parallel) as pool:
        for i, res in enumerate(pool.map(lambda a: run_arm(a, args.config, common, out_root, log_dir), todo), 1):
            results.append(res)
            print(f"[compare] {i}/{len(todo)} {res['name']} {res['seconds']:.0f}s", flush=True)
    rows = [r for res in results for r in rows_of(res, task, cfg.model.name_or_path, cfg.peft.method, metric)]
    cells, table = summarise(rows)
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {"task": task, "config": args.config, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "wall_seconds": round(time.time() - t0, 1), "cpu_count": os.cpu_count(), "parallel": args.parallel}
    (results_dir / f"compare-{task}.json").write_text(json.dumps({"meta": meta, "rows": rows, "cells": cells},
                                                                 indent=1))
    (results_dir / f"compare-{task}.md").write_text(f"`{meta['command']}` ({meta['wall_seconds'] / 60:.1f} min, "
                                                    f"{meta['cpu_count']} CPU cores)\n\n" + table)
    plot(rows, cells, results_dir / f"compare-{task}.png", f"{task} ({cfg.model.name_or_path})")
    print(table, flush=True)
    print(f"[compare] wrote {results_dir}/compare-{task}.{{json,md,png}} in {meta['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

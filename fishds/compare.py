"""Does a FISH mask help on your task? Selection rules vs random masks vs plain PEFT, at matched budgets, as an
honest protocol: paired seeds, each arm's learning rate chosen on validation, paired differences with 95% CIs.

    fishds compare --config my.yaml --quick [--seeds 0 1 2 3 4] [--screen-seeds 0 1] [--lrs 1e-3 3e-3]
        [--budgets p1:8:2] [--parallel 2] [key=value ...]
    fishds compare --config configs/compare/rt-minilm.yaml [--seeds 0 1 2 3 4] [--lrs 3e-3 1e-2 3e-2 1e-1]
        [--arm-lrs dense=3e-3,1e-2 random=1e-2,3e-2] [--metric accuracy|token_acc|loss|ppl]
        [--budgets p1:16:4 p2:8:0.25] [--arms fisher random dense saliency/module@20 ...] [--parallel 2]
        [--arm-set dense~frozen:fish.freeze=[lora_A] ...] [--split eval|test] [key=value ...]

(`python bench/compare.py ...` in a checkout is the same command.) A thin driver over `fishds train` (one process
per run, `python -m fishds.cli train`, OMP_NUM_THREADS=1, `--parallel` runs at a time, DeepSpeed's built-in ZeRO-0
JSON). The config is a normal fishds YAML with data.path, data.eval_path (validation: picks the learning rate) and
data.test_path (reported, never used for a choice); the built-in tasks (`data.path: rotten_tomatoes |
spam_assassin | first_names | ...`, fishds.assets.TASKS) are expanded to their cached jsonl files.

`--quick` answers one question, "does fishds' default rule help on my task?", in two phases:
- arms: `dense` (plain PEFT at the matched rank), `random` (a random mask of the same count) and the default rule
  (the name of fishds.fish.config.FishSection()'s rule, e.g. `fisher`; its dense steps as a run would take them);
- budget: protocol 1 at the config's peft.r = R, masked to the count of rank max(1, R // 4) (`--budgets` one spec);
- screen: `--screen-seeds` (default 0 1) on validation over the rates {train.lr, 3 x train.lr} (`--lrs`,
  `--arm-lrs`), choosing each arm's rate (an arm with one rate skips it);
- confirm: `--seeds` (default 0 1 2 3 4) on the test split at each arm's chosen rate (on validation, said loudly,
  when the config has no data.test_path).
It prints the plan, runs the first run alone and prints the expected wall time measured on it, and ends with one
verdict line: the default rule against plain PEFT at the same trainable count, paired over the confirmation seeds,
`helps` (95% CI above 0, in the better direction of the metric), `hurts` (below) or `no evidence`, with the
equivalence bound the interval gives (effects beyond max(|lo|, |hi|) are ruled out). Results: quick-<task>.*.

Arms (`--arms`, names also used in the tables):
- `dense`: plain PEFT at the matched rank (plain LoRA at the same trainable count); `dense_pool`: plain PEFT at the
  pool's rank (upper reference, more trainable entries);
- `SCORE[/ALLOCATION][+CONTROL][@WARMUP]`: a selection rule (fish.score, fish.allocation, fish.control, and
  fish.dense_steps dense steps counted in train.max_steps), e.g. `fisher` (Fisher, global top-k, the default dense
  steps), `fisher@20`, `saliency/module@20`, `adam_v/tensor@20`, `saliency/module+random_matched@20` (random
  entries with that rule's per-tensor counts), `random`, `random/tensor`, `lowest`;
- `random_b_only` (random entries of lora_B only), `head_only` (classification: the head alone);
- legacy names: `fisher_warmup` = `fisher@W` (W = --warmup);
- any of them with `~LABEL` (e.g. `dense~frozen`, `grad/rank~frozen`): the same arm under another name, for a second
  setting of it; `--arm-set ARM:KEY=VALUE` gives one arm its own config fields (e.g. `--arm-set
  dense~frozen:fish.freeze=[lora_A]`: plain LoRA with lora_A frozen beside plain LoRA, paired in one table).
Random arms (score random, or control random_matched / random_b_only) are the controls every rule is compared with.

Budgets (../shared/FISH_TUNING.md section 1):
- p1:R:r  protocol 1: rank R masked down to the trainable count of plain rank r (fish.budget=match_rank);
- p2:R:p  protocol 2: rank R at keep ratio p, against plain rank R*p.
Every arm uses peft.alpha = 2 x rank, the same steps, schedule and learning-rate grid, and the same seeds: train.seed
fixes the adapter's and the head's initialisation and the data order, fish.seed the scoring sample and random
masks, so seed i of every arm sees the same batches with the same head (paired seeds). For each (budget, arm) the
learning rate with the best mean validation metric over seeds is chosen (highest accuracy, lowest loss); a warning
is printed (and kept in the JSON) when that choice sits at the edge of the grid, or when the grid does not reach
10 x plain PEFT's chosen rate. With `--split test` (the default) the test metric at the chosen rate is reported:
mean +- std over seeds, and per arm the paired difference to plain PEFT and to every random arm (same seed, each arm
at its own chosen rate) with a 95% t-interval over seeds. `--split eval` (screening) never reads the test metric:
the table shows validation. The metric: accuracy for a classifier, token accuracy otherwise (`--metric loss` or
`ppl`: lower is better; tables and differences then in the metric's units instead of points).

Writes <results>/<prefix>-<task>.json ({"meta", "rows": one row per run and split (task, model, method, selection,
score, allocation, budget, trainable, seed, lr, split, metric, value, seconds), "cells": per arm the chosen rate, the
figures, the paired differences, the A/B share, per-layer allocation and row/column coverage of its masks,
"warnings"}), .md (the tables) and .png (figures per arm with every seed; validation curves). <results> defaults to
bench/results and the runs to runs/compare in a fishds checkout (run from inside it), else ./fishds-compare and
./fishds-compare/runs.
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
from types import SimpleNamespace

from .config import ConfigError, load_config
from .files import METRICS_FILE, REPORT_FILE

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository, when fishds runs from a source checkout
SELECTIONS = ("fisher", "random", "lowest", "dense", "fisher_warmup")  # the legacy arm names
SEEDS = [0, 1, 2, 3, 4]  # paired seeds: the protocol's >= 5
LRS = [3e-3, 1e-2, 3e-2, 1e-1]
BUDGETS = ["p1:16:4", "p2:8:0.25"]
SCREEN_SEEDS = [0, 1]  # --quick: the screen's seeds
NO_TEST = (
    "WARNING: the config has no data.test_path: the confirmation reports the VALIDATION split, the same data that "
    "chose the learning rates (optimistic); set data.test_path for an honest figure"
)
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


class CompareError(ValueError):
    """Bad input to the comparison (an arm, a budget, a rate grid, a config it cannot compare with)."""


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom (table; the next smaller tabulated df above 60
    is conservative)."""
    return T975[max(d for d in T975 if d <= df)] if df < 60 else 1.96 if df > 1000 else T975[60]


def parse_arm(name: str, warmup: int) -> dict:
    """An arm name -> its fish overrides (see the module docstring): a rule name of fishds/fish/rules.py's grammar
    (rules.parse), with @WARMUP, or dense_pool / fisher_warmup; a ~LABEL suffix names a second setting of the arm."""
    from fishds.fish import rules
    from fishds.fish.selection import RULES

    name, label = base_arm(name), name.partition("~")[2]
    if label and not label.replace("-", "").replace("_", "").isalnum():
        raise CompareError(f"arm {name}~{label}: a ~LABEL is letters, digits, - and _")

    def own_rule(fish: dict) -> dict:  # the arm's score as fish.selection too where it is one of its shorthands, so
        # that a config's own fish.selection (e.g. random, as the recipes have) gives way to the arm's rule
        return {**fish, "fish.selection": fish["fish.score"]} if fish["fish.score"] in RULES else fish

    if name == "fisher_warmup":
        name = f"fisher@{warmup}"
    rest, _, w = name.partition("@")
    try:
        fields = rules.parse("dense" if rest == "dense_pool" else rest)
    except ValueError as e:
        raise CompareError(
            f"arm {name!r}: use SCORE[/ALLOCATION][+CONTROL][@WARMUP], or dense, dense_pool, "
            f"random_b_only, head_only, fisher_warmup ({e})"
        ) from None
    if w and not w.isdigit():
        raise CompareError(f"arm {name!r}: @WARMUP must be a number of dense steps, e.g. fisher@20")
    if "selection" in fields:
        return {"name": name, "score": "dense", "allocation": "-", "fish": {"fish.selection": "dense"}, "warmup": 0}
    control = fields["control"]
    if not rules.CONTROLS[control].runs_rule:  # a control that names itself: no rule, no warm-up
        score = fields["score"] if rules.CONTROLS[control].trains_pool else "-"
        fish = own_rule({"fish.score": fields["score"], "fish.control": control})
        return {"name": name, "score": score, "allocation": "-", "fish": fish, "warmup": 0}
    fish = own_rule({"fish.score": fields["score"], "fish.allocation": fields["allocation"]})
    if control != "none":
        fish["fish.control"] = control
    return {
        "name": name,
        "score": fields["score"],
        "allocation": fields["allocation"],
        "fish": fish,
        "warmup": int(w or 0),
    }


def base_arm(arm: str) -> str:
    """The arm without its ~LABEL: dense~frozen -> dense."""
    return arm.partition("~")[0]


def is_random_arm(arm: str) -> bool:
    arm = base_arm(arm)
    return arm.startswith("random") or "+random_matched" in arm


def task_files(cfg, need_test: bool = True) -> dict[str, str]:
    """data.path / eval_path / test_path; the built-in task names become their cached jsonl splits. Without
    need_test, a config without data.test_path gives no "data.test_path" entry."""
    d = cfg.data
    from . import assets

    if d.path in assets.TASKS:
        files = assets.TASKS[d.path]("classification" if d.format == "classification" else "alpaca")
        return {
            "data.path": str(files["train"]),
            "data.eval_path": str(files["validation"]),
            "data.test_path": str(files["test"]),
        }
    if not (d.eval_path and (d.test_path or not need_test)):
        raise CompareError(
            "the config needs data.eval_path (validation, picks the learning rate)"
            + (" and data.test_path (reported)" if need_test else "")
        )
    files = {"data.path": d.path, "data.eval_path": d.eval_path}
    return {**files, "data.test_path": d.test_path} if d.test_path else files


def parse_budget(spec: str) -> dict:
    try:
        kind, big, small = spec.split(":")
        int(big), float(small), kind != "p1" or int(small)
    except ValueError:
        raise CompareError(f"budget {spec!r}: use p1:R:r or p2:R:p") from None
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
            raise CompareError(f"budget {spec}: rank {big} x keep {small} is not a whole rank")
        return {
            "name": spec,
            "fish": {"peft.r": int(big), "fish.keep_ratio": float(small)},
            "dense": {"peft.r": int(plain)},
            "pool": {"peft.r": int(big)},
        }
    raise CompareError(f"budget {spec!r}: use p1:R:r or p2:R:p")


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
            raise CompareError(f"--arm-lrs {spec!r}: write ARM=LR[,LR...], e.g. dense=3e-3,1e-2")
    return out


def parse_arm_sets(specs) -> dict[str, dict[str, str]]:
    """`--arm-set ARM:KEY=VALUE ...` -> {arm: {key: value}}: config fields of that arm alone."""
    out: dict[str, dict[str, str]] = {}
    for spec in specs or []:
        arm, sep, field = spec.partition(":")
        key, eq, value = field.partition("=")
        if not (arm and sep and eq and "." in key):
            raise CompareError(
                f"--arm-set {spec!r}: write ARM:SECTION.KEY=VALUE, e.g. dense~frozen:fish.freeze=[lora_A]"
            )
        out.setdefault(arm, {})[key] = value
    return out


def arms(
    budgets,
    seeds,
    lrs,
    names,
    steps: int,
    warmup: int,
    arm_lrs: dict | None = None,
    arm_sets: dict | None = None,
) -> list[dict]:
    """Every run: budget x arm x learning rate (the arm's own grid from arm_lrs, else lrs) x seed; an arm's own
    fields (arm_sets) over the budget's and the rule's."""
    out = []
    if len(set(names)) != len(names):
        raise CompareError(f"--arms lists an arm twice: {' '.join(names)} (name a second setting ARM~LABEL)")
    for flag, given in (("--arm-lrs", arm_lrs), ("--arm-set", arm_sets)):
        unknown = sorted(set(given or {}) - set(names))
        if unknown:
            raise CompareError(f"{flag} names arms that --arms does not list: {', '.join(unknown)}")
    for b in budgets:
        for name in names:
            spec = parse_arm(name, warmup)
            base = base_arm(name)
            for lr in (arm_lrs or {}).get(name, lrs):
                for seed in seeds:
                    ov = dict(b["dense"] if base == "dense" else b["pool"] if base == "dense_pool" else b["fish"])
                    ov.update(spec["fish"])
                    ov.update(
                        {"train.seed": seed, "fish.seed": seed, "train.lr": lr, "peft.alpha": 2 * ov["peft.r"]}
                    )  # alpha/r = 2 in every arm: the same LoRA scaling
                    if spec["warmup"]:  # dense steps, then score: the same total steps as every arm
                        if spec["warmup"] >= steps:
                            raise CompareError(f"arm {name}: dense steps {spec['warmup']} >= train.max_steps {steps}")
                        ov.update({"fish.dense_steps": spec["warmup"], "train.max_steps": steps})  # counted in it
                    ov.update((arm_sets or {}).get(name, {}))
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


def train_command(config: str, ds_config: Path, overrides: dict) -> list[str]:
    """`fishds train` in a fresh interpreter (the same run as launch/train.py)."""
    cmd = [sys.executable, "-m", "fishds.cli", "train", "--config", config, "--ds_config", str(ds_config)]
    return cmd + [f"{k}={v}" for k, v in overrides.items()]


def child_env() -> dict:
    """One thread per run; a source checkout's fishds first on the path (the runs import this fishds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "fishds").is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


ZERO0 = "zero0.json"


def run_arm(arm: dict, config: str, common: dict, out_root: Path, log_dir: Path) -> dict:
    tag = arm["selection"].replace("/", "-").replace("+", "-").replace("@", "-w").replace("~", "-")
    name = f"{arm['budget'].replace(':', '-')}_{tag}_lr{arm['lr']:g}_s{arm['seed']}"
    out = out_root / name
    if (out / REPORT_FILE).is_file():  # finished earlier: reuse (delete the folder to rerun)
        return {**arm, "name": name, "out": str(out), "seconds": json.loads((out / "arm.json").read_text())["seconds"]}
    ov = {**common, **{k: v for k, v in arm["overrides"].items()}, "output_dir": str(out), "overwrite": "true"}
    ds_config = out_root / ZERO0  # written by launch(): ZeRO-0, whatever the config names
    t0 = time.time()
    with open(log_dir / f"{name}.log", "w") as log:
        proc = subprocess.run(
            train_command(config, ds_config, ov), env=child_env(), stdout=log, stderr=subprocess.STDOUT
        )
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed ({proc.returncode}); see {log_dir / (name + '.log')}")
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


def higher_is_better(metric: str) -> bool:
    """accuracy, token_acc: higher is better; loss, ppl: lower (the rule of train.metric_for_best)."""
    from .run.best import higher_is_better as better

    try:
        return better(metric)
    except ConfigError:
        raise CompareError(f"metric {metric!r}: use accuracy, token_acc, loss or ppl") from None


def units(metric: str) -> tuple[float, int, str]:
    """How a metric's figures are shown: a fraction (accuracy) as points (x 100, 2 decimals), a loss or perplexity
    in its own units (4 decimals)."""
    return (100.0, 2, "points") if higher_is_better(metric) else (1.0, 4, metric)


def summarise(
    rows: list[dict], masks: dict | None = None, split: str = "test", grid_warnings: bool = True
) -> tuple[list[dict], str, list[str]]:
    """Per (budget, arm): the learning rate with the best mean validation metric (highest accuracy, lowest loss), the
    `split` figures at that rate (per seed), paired differences to plain PEFT and to every random arm, the mask
    statistics; the markdown; the warnings (choice at the grid's edge, grid short of 10 x plain PEFT's rate, with
    grid_warnings; fewer than 5 seeds)."""
    masks = masks or {}
    metric = rows[0]["metric"].split("_", 1)[1]
    best = max if higher_is_better(metric) else min
    k, digits, unit = units(metric)
    cells, warnings = [], []
    grid = sorted({r["lr"] for r in rows})
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for sel in dict.fromkeys(r["selection"] for r in rows if r["budget"] == budget):
            mine = [r for r in rows if r["budget"] == budget and r["selection"] == sel]
            by_lr = {}
            for r in mine:
                by_lr.setdefault(r["lr"], {"eval": {}, "test": {}})[r["split"]][r["seed"]] = r["value"]
            lr = best(sorted(by_lr), key=lambda x: statistics.mean(by_lr[x]["eval"].values()))
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
                "metric": metric,
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
            if grid_warnings and len(by_lr) > 1 and lr in (min(by_lr), max(by_lr)):
                edge = "top" if lr == max(by_lr) else "bottom"
                warnings.append(
                    f"{budget} {sel}: the chosen lr {lr:g} is at the {edge} "
                    f"of the grid {sorted(by_lr)}; extend the grid"
                )
            if len(vals) < 5:
                warnings.append(f"{budget} {sel}: {len(vals)} seeds; the protocol asks for >= 5 paired seeds")
            cells.append(cell)
        dense = next((c for c in cells if c["budget"] == budget and c["selection"] == "dense"), None)
        if grid_warnings and dense and max(grid) < 10 * dense["lr"]:
            warnings.append(
                f"{budget}: the grid's top {max(grid):g} is below 10 x plain PEFT's chosen lr "
                f"{dense['lr']:g}; sparse masks need larger rates (FISH_TUNING.md 6.4)"
            )
        controls = [c for c in cells if c["budget"] == budget and is_random_arm(c["selection"])]
        for c in (c for c in cells if c["budget"] == budget):
            refs = ([dense] if dense and c is not dense else []) + [r for r in controls if r is not c]
            c["paired"] = {r["selection"]: paired(c["per_seed"], r["per_seed"]) for r in refs}

    def diff(d):
        if d is None:
            return "–"
        if d["ci95"] is None:
            return f"{k * d['mean']:+.{digits}f} (n={d['n']})"
        return f"{k * d['mean']:+.{digits}f} [{k * d['ci95'][0]:+.{digits}f}, {k * d['ci95'][1]:+.{digits}f}]"

    def fig(v):
        return f"{k * v:.{digits}f}"

    lines = [
        f"| budget | arm | score | allocation | trainable | lr (by validation) | {split} {metric}: mean ± std "
        f"(min–max) | seeds | lora_A share | Δ vs plain (95% CI) |",
        "|---" * 10 + "|",
    ]
    for c in cells:
        share = c["mask"].get("share", {}).get("lora_A")
        lines.append(
            f"| {c['budget']} | {c['selection']} | {c['score']} | {c['allocation']} | {c['trainable']:,} | "
            f"{c['lr']:g} | {fig(c['mean'])} ± {fig(c['std'])} ({fig(c['min'])}–"
            f"{fig(c['max'])}) | {c['n']} | {'–' if share is None else f'{share:.2f}'} | "
            f"{diff(c['paired'].get('dense'))} |"
        )
    randoms = list(dict.fromkeys(c["selection"] for c in cells if is_random_arm(c["selection"])))
    if randoms:
        lines += [
            "",
            f"Paired {split} differences to each random arm ({unit}, mean [95% CI], same seeds):",
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

    k, _, unit = units(cells[0]["metric"])
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
            ax.scatter([x] * len(tests), [k * v for v in tests], color=f"C{si % 10}", s=12, alpha=0.6)
            ax.errorbar(
                [x],
                [k * c["mean"]],
                yerr=[k * c["std"]],
                fmt="o",
                color=f"C{si % 10}",
                label=sel if bi == 0 else None,
                capsize=4,
            )
    ax.set_xticks([bi * (len(SELECTIONS) + 1) + 1.5 for bi in range(len(budgets))], budgets)
    ax.set_ylabel(f"{cells[0]['split']} {cells[0]['metric']}" + (" (%)" if unit == "points" else ""))
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
            mean = [k * statistics.mean(cv[i][1] for cv in curves) for i in range(len(steps))]
            ax.plot(steps, mean, label=sel, color=f"C{si % 10}")
        ax.set_title(f"{budget}: validation curve (mean over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def verdict(cells: list[dict], rule: str, plain: str) -> dict:
    """The default rule `rule` against plain PEFT (arm `dense`, named `plain` in the line) and against `random`,
    paired over the seeds both ran, each arm at its chosen rate: {"verdict": helps | no evidence | hurts, "mean",
    "ci95", "n", "bound" (effects beyond +-bound are ruled out: max(|lo|, |hi|)), "line", "random_line"}. helps: the
    95% CI lies entirely on the better side of 0 (above for accuracy, below for a loss); hurts: entirely on the worse
    side; figures in points (accuracy x 100) or the metric's units."""
    cell = next(c for c in cells if c["selection"] == rule)
    higher = higher_is_better(cell["metric"])
    k, digits, unit = units(cell["metric"])

    def judge(d):
        if d is None or d["ci95"] is None:
            return "no evidence"
        lo, hi = d["ci95"]
        better, worse = (lo > 0, hi < 0) if higher else (hi < 0, lo > 0)
        return "helps" if better else "hurts" if worse else "no evidence"

    def figures(d):
        if d is None:
            return "no paired seeds"
        if d["ci95"] is None:
            return f"{k * d['mean']:+.{digits}f} {unit}, no interval ({d['n']} paired seed)"
        lo, hi = d["ci95"]
        return (
            f"{k * d['mean']:+.{digits}f} {unit} [{k * lo:+.{digits}f}, {k * hi:+.{digits}f}] 95% CI over "
            f"{d['n']} paired seeds"
        )

    d, r = cell["paired"].get("dense"), cell["paired"].get("random")
    out = {"verdict": judge(d), "rule": rule, "plain": plain, "metric": cell["metric"], "split": cell["split"]}
    out.update({key: d[key] for key in ("mean", "ci95", "n")} if d else {"mean": None, "ci95": None, "n": 0})
    out["bound"] = max(abs(x) for x in d["ci95"]) if d and d["ci95"] else None
    ruled = f"effects beyond +-{k * out['bound']:.{digits}f} ruled out" if out["bound"] is not None else "no bound"
    out["line"] = f"verdict: {out['verdict']}: {rule} vs {plain}: {figures(d)}; {ruled}"
    word = {"helps": "better", "hurts": "worse", "no evidence": "no difference shown"}[judge(r)]
    out["random_line"] = f"{rule} vs a random mask of the same count: {figures(r)} ({word})"
    return out


def default_dirs(repo: Path | None = None) -> tuple[Path, Path]:
    """(runs, results): runs/compare and bench/results of the fishds checkout (`repo`, or the one fishds is imported
    from when the current folder is inside it), else ./fishds-compare/runs and ./fishds-compare."""
    if repo is None and (CHECKOUT / "bench" / "compare.py").is_file():
        cwd = Path.cwd().resolve()
        repo = CHECKOUT if cwd == CHECKOUT or CHECKOUT in cwd.parents else None
    if repo is not None:
        return repo / "runs" / "compare", repo / "bench" / "results"
    return Path("fishds-compare") / "runs", Path("fishds-compare")


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--config", required=True, help="fishds YAML config (data.path, data.eval_path, data.test_path)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="does fishds' default rule help on this task? plain PEFT, a random mask and the default rule at the "
        "config's peft.r masked to the count of rank peft.r // 4; a screen of the rates on validation, then a "
        "confirmation on test; ends with one verdict line",
    )
    ap.add_argument("--task", help="name in the output files (default: the config file's stem)")
    ap.add_argument(
        "--seeds", type=int, nargs="+", help="paired seeds, e.g. 0 1 2 3 4 (the default; --quick: the confirmation's)"
    )
    ap.add_argument("--screen-seeds", type=int, nargs="+", help="--quick: the screen's paired seeds (default 0 1)")
    ap.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        help="learning-rate grid (default 3e-3 1e-2 3e-2 1e-1; --quick: train.lr and 3 x train.lr)",
    )
    ap.add_argument(
        "--arm-lrs",
        nargs="+",
        default=[],
        metavar="ARM=LR,LR",
        help="an arm's own learning-rate grid (e.g. dense=3e-3,1e-2 after a screen); the other arms use --lrs",
    )
    ap.add_argument(
        "--arm-set",
        nargs="+",
        default=[],
        metavar="ARM:KEY=VALUE",
        help="config fields of one arm alone, e.g. dense~frozen:fish.freeze=[lora_A] (with --arms dense "
        "dense~frozen: plain LoRA beside plain LoRA with lora_A frozen); not with --quick",
    )
    ap.add_argument(
        "--budgets",
        nargs="+",
        help="p1:R:r and p2:R:p specs (default p1:16:4 p2:8:0.25; --quick: one, p1:R:max(1, R // 4), R = peft.r)",
    )
    ap.add_argument(
        "--arms",
        "--selections",
        dest="arms",
        nargs="+",
        help="arm names (docs/results.md): dense, fisher, random, saliency/module@20, ... "
        f"(default {' '.join(SELECTIONS)}; --quick chooses its own)",
    )
    ap.add_argument(
        "--metric",
        choices=("accuracy", "token_acc", "loss", "ppl"),
        help="what is compared (default: accuracy for a classifier, token_acc otherwise; loss, ppl: lower is better)",
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
        "--prefix", default=None, help="results file prefix (default: compare, screen with --split eval, quick)"
    )
    ap.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument(
        "--runs",
        help="where the runs' output_dirs go (default: runs/compare in a fishds checkout, else ./fishds-compare/runs)",
    )
    ap.add_argument(
        "--results", help="where the tables go (default: bench/results in a checkout, else ./fishds-compare)"
    )
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    return ap


def plan(args, repo: Path | None = None) -> SimpleNamespace:
    """Everything decided before a run starts (CompareError / ConfigError on bad input): the config, the metric, the
    folders, and the phases: one (the matrix), or with --quick a screen (its runs) and a confirmation (its arms and
    seeds; each arm's rate comes from the screen)."""
    from .fish import rules
    from .fish.config import FishSection

    if args.parallel < 1:
        raise CompareError("--parallel must be >= 1")
    cfg = load_config(args.config, list(args.overrides))
    classification = cfg.data.format == "classification"
    metric = args.metric or ("accuracy" if classification else "token_acc")
    reported = ("accuracy", "loss") if classification else ("token_acc", "loss", "ppl")
    if metric not in reported:
        raise CompareError(f"--metric {metric}: data.format={cfg.data.format} reports {', '.join(reported)}")
    runs, results = default_dirs(repo)
    p = SimpleNamespace(
        config=args.config,
        cfg=cfg,
        task=args.task or Path(args.config).stem,
        metric=metric,
        runs=Path(args.runs) if args.runs else runs,
        results=Path(args.results) if args.results else results,
        parallel=args.parallel,
        quick=args.quick,
        arm_lrs=parse_arm_lrs(args.arm_lrs),
        steps=cfg.train.max_steps,
        warmup=args.warmup,
    )
    given = dict(o.split("=", 1) for o in args.overrides)
    if not args.quick:
        if args.screen_seeds:
            raise CompareError("--screen-seeds is the screen of --quick; without it, --split eval screens")
        files = task_files(cfg)
        if args.split == "eval":
            files.pop("data.test_path")  # screening never evaluates the test split
        p.seeds, p.lrs, p.arms = args.seeds or SEEDS, args.lrs or LRS, args.arms or list(SELECTIONS)
        p.budgets = [parse_budget(b) for b in args.budgets or BUDGETS]
        p.split, p.prefix = args.split, args.prefix or ("compare" if args.split == "test" else "screen")
        p.arm_sets = parse_arm_sets(args.arm_set)
        p.todo = arms(p.budgets, p.seeds, p.lrs, p.arms, p.steps, p.warmup, p.arm_lrs, p.arm_sets)
        p.out_root = p.runs / (p.task if args.split == "test" else f"{p.task}-screen")
        p.common = {**given, **files}
        check_arms(args.config, args.overrides, p.todo)
        return p
    if args.arms:
        raise CompareError("--quick runs dense, random and the default rule; drop --arms (or drop --quick)")
    if args.arm_set:
        raise CompareError("--quick runs its own arms; --arm-set is for a matrix (drop --quick)")
    if args.split != "test":
        raise CompareError("--quick screens on validation and confirms on test itself; drop --split")
    default = FishSection()
    p.rule = rules.label(default)  # the default rule's name, e.g. fisher
    p.rule_fields = {
        "fish.score": default.score,
        "fish.allocation": default.allocation,
        "fish.control": default.control,
    }
    p.rule_dense_steps = (
        FishSection(dense_steps=cfg.fish.dense_steps).dense_steps_for(p.steps) if p.steps else None
    )  # what the rule's runs take: the config's fish.dense_steps, else the default for the run's length
    specs = args.budgets or [f"p1:{cfg.peft.r}:{max(1, cfg.peft.r // 4)}"]
    if len(specs) != 1:
        raise CompareError(f"--quick compares at one budget; --budgets gave {len(specs)}")
    p.budget = parse_budget(specs[0])
    p.plain_r, p.pool_r = p.budget["dense"]["peft.r"], p.budget["fish"]["peft.r"]
    if p.plain_r >= p.pool_r:
        raise CompareError(
            f"budget {specs[0]}: plain rank {p.plain_r} is not below the masked rank {p.pool_r}; --quick needs "
            "peft.r >= 2 (it masks rank peft.r to the count of rank peft.r // 4), or --budgets p1:R:r with r < R"
        )
    p.arms = list(dict.fromkeys(["dense", "random", p.rule]))
    unknown = sorted(set(p.arm_lrs) - set(p.arms))
    if unknown:
        raise CompareError(
            f"--arm-lrs names arms that --quick does not run ({', '.join(p.arms)}): {', '.join(unknown)}"
        )
    p.lrs = args.lrs or sorted({cfg.train.lr, 3 * cfg.train.lr})
    p.seeds, p.screen_seeds = args.seeds or SEEDS, args.screen_seeds or SCREEN_SEEDS
    if len(set(p.seeds)) < 2:
        raise CompareError("--seeds: the verdict needs at least 2 paired seeds (5 are the protocol)")
    p.prefix = args.prefix or "quick"
    files = task_files(cfg, need_test=False)
    p.has_test = "data.test_path" in files
    p.split = "test" if p.has_test else "eval"
    screened = [n for n in p.arms if len(p.arm_lrs.get(n, p.lrs)) > 1]  # one rate: nothing to choose
    grids = {n: p.arm_lrs[n] for n in screened if n in p.arm_lrs}
    p.screen = arms([p.budget], p.screen_seeds, p.lrs, screened, p.steps, p.warmup, grids)
    p.screen_root = p.runs / f"{p.task}-screen"
    p.screen_common = {**given, **{k: v for k, v in files.items() if k != "data.test_path"}}
    # the confirmation's runs at a rate decided later; built here once so that bad arms fail before any run
    todo = arms([p.budget], p.seeds, p.lrs[:1], p.arms, p.steps, p.warmup)
    p.out_root = p.runs / (p.task if p.has_test else f"{p.task}-screen")  # runs without test data stay apart
    p.common = {**given, **files}
    check_arms(args.config, args.overrides, p.screen + todo)
    return p


def check_arms(config: str, overrides: list[str], todo: list[dict]) -> None:
    """Every arm's config (the config, the overrides, the arm's own) validates: a contradiction (e.g. the config's
    fish.selection against an arm's fish.score) is refused before the first run."""
    seen = set()
    for arm in todo:
        if (arm["budget"], arm["selection"]) in seen:
            continue
        seen.add((arm["budget"], arm["selection"]))
        try:
            load_config(config, list(overrides) + [f"{k}={v}" for k, v in arm["overrides"].items()])
        except ConfigError as e:
            raise CompareError(f"arm {arm['selection']} at {arm['budget']}: {e}") from None


class Runner:
    """Runs `fishds train` processes, `parallel` at a time; the very first alone, timed, then the expected wall time
    of all `total` runs (measured on it) before the others start."""

    def __init__(self, p: SimpleNamespace, total: int):
        self.p, self.total, self.done, self.first = p, total, 0, None

    def _report(self, phase: str, res: dict) -> None:
        self.done += 1
        print(f"[compare] {phase} {self.done}/{self.total} {res['name']} {res['seconds']:.0f}s", flush=True)

    def run(self, phase: str, todo: list[dict], common: dict, out_root: Path) -> list[dict]:
        from .dsconfig import DEFAULT

        log_dir = out_root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        if not (out_root / ZERO0).is_file():
            (out_root / ZERO0).write_text(json.dumps(DEFAULT, indent=1))

        def one(arm):
            return run_arm(arm, self.p.config, common, out_root, log_dir)

        results = []
        if todo and self.first is None:
            self.first = one(todo[0])
            at_once = max(1, min(self.p.parallel, self.total))
            wall = self.total * self.first["seconds"] / at_once
            print(
                f"[compare] expected wall time: {self.total} runs x {self.first['seconds']:.0f} s / {at_once} "
                f"parallel = {wall / 60:.1f} min (measured on the first run)",
                flush=True,
            )
            self._report(phase, self.first)
            results.append(self.first)
            todo = todo[1:]
        with futures.ThreadPoolExecutor(self.p.parallel) as pool:
            for res in pool.map(one, todo):
                self._report(phase, res)
                results.append(res)
        return results


def _rows(p: SimpleNamespace, results: list[dict], splits) -> tuple[list[dict], dict]:
    cfg = p.cfg
    rows = [
        r for res in results for r in rows_of(res, p.task, cfg.model.name_or_path, cfg.peft.method, p.metric, splits)
    ]
    masks = {(res["budget"], res["selection"], res["lr"], res["seed"]): mask_of(res) for res in results}
    return rows, masks


def _meta(p: SimpleNamespace, command: str, t0: float, results: list[dict], **extra) -> dict:
    return {
        "task": p.task,
        "config": p.config,
        "command": command,
        "wall_seconds": round(time.time() - t0, 1),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),  # UTC day the matrix finished
        "cpu_count": os.cpu_count(),
        "parallel": p.parallel,
        "split": p.split,
        "seeds": p.seeds,
        "lrs": p.lrs,
        "arm_lrs": p.arm_lrs,
        "arm_sets": getattr(p, "arm_sets", {}),
        "arms": p.arms,
        "metric": p.metric,
        "run_seconds_median": statistics.median(r["seconds"] for r in results) if results else None,
        **extra,
    }


def _write(p: SimpleNamespace, meta: dict, payload: dict, markdown: str, rows: list[dict], cells: list[dict]) -> Path:
    p.results.mkdir(parents=True, exist_ok=True)
    stem = p.results / f"{p.prefix}-{p.task}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **payload}, indent=1))
    stem.with_suffix(".md").write_text(
        f"`{meta['command']}` ({meta['date']}, {meta['wall_seconds'] / 60:.1f} min wall, "
        f"{meta['cpu_count']} CPU cores, median {meta['run_seconds_median']:.0f} s "
        f"per run)\n\n" + markdown
    )
    try:
        plot(rows, cells, stem.with_suffix(".png"), f"{p.task} ({p.cfg.model.name_or_path})")
    except ImportError as e:
        print(f"[compare] no plot ({e})")
    return stem


def run_matrix(p: SimpleNamespace, command: str) -> int:
    print(
        f"[compare] {p.task}: {len(p.todo)} runs ({len(p.budgets)} budgets x {len(p.arms)} arms x "
        f"{len(p.lrs)} lrs{' (or their own grid)' if p.arm_lrs else ''} x {len(p.seeds)} seeds), "
        f"{p.parallel} at a time",
        flush=True,
    )
    t0 = time.time()
    results = Runner(p, len(p.todo)).run("run", p.todo, p.common, p.out_root)
    rows, masks = _rows(p, results, ("eval", "test") if p.split == "test" else ("eval",))
    cells, table, warnings = summarise(rows, masks, p.split)
    for w in warnings:
        print(f"[compare] warning: {w}", flush=True)
    meta = _meta(p, command, t0, results)
    stem = _write(p, meta, {"rows": rows, "cells": cells, "warnings": warnings}, table, rows, cells)
    print(table, flush=True)
    print(f"[compare] wrote {stem}.{{json,md,png}} in {meta['wall_seconds'] / 60:.1f} min")
    return 0


def _plain_name(p: SimpleNamespace) -> str:
    method = p.cfg.peft.method
    return f"plain {'LoRA' if method == 'lora' else method} r={p.plain_r}"


def describe(p: SimpleNamespace) -> list[str]:
    """--quick's plan, printed before any run: arms, budget, metric, seeds and rates of both phases."""
    plain, b = _plain_name(p), p.budget["name"]
    rule = ", ".join(f"{k}={v}" for k, v in p.rule_fields.items() if not (k == "fish.control" and v == "none"))
    n = p.rule_dense_steps
    dense = f"{n} dense step{'' if n == 1 else 's'} before scoring" if n is not None else "the default dense steps"
    budget = (
        f"rank {p.pool_r} masked to the trainable count of rank {p.plain_r}"
        if b.startswith("p1")
        else f"rank {p.pool_r} at keep ratio {b.split(':')[2]}, against rank {p.plain_r}"
    )
    grids = {n: p.arm_lrs.get(n, p.lrs) for n in p.arms}
    rates = "; ".join(f"{n}: {' '.join(f'{x:g}' for x in g)}" for n, g in grids.items())
    screened = sorted({a["selection"] for a in p.screen}, key=p.arms.index)
    confirm = len(p.arms) * len(p.seeds)
    where = "test split" if p.has_test else "VALIDATION split (no data.test_path)"
    better = "higher" if higher_is_better(p.metric) else "lower"
    return [
        f"[compare] quick: does {p.rule} (fishds' default rule) help on {p.task} ({p.cfg.model.name_or_path})?",
        f"[compare] arms: dense = {plain} (the same trainable count); random = a random mask of that count; "
        f"{p.rule} = the default rule ({rule}, {dense})",
        f"[compare] budget: {b} ({_plain_name(p).split()[1]} {budget}); metric: {p.metric} ({better} is better)",
        f"[compare] rates: {rates}",
        f"[compare] screen on validation, choosing each arm's rate: seeds {' '.join(map(str, p.screen_seeds))}, "
        + (f"arms {' '.join(screened)}: {len(p.screen)} runs" if p.screen else "nothing to choose: no runs"),
        f"[compare] confirm on the {where} at each arm's chosen rate: seeds {' '.join(map(str, p.seeds))} x "
        f"{len(p.arms)} arms = {confirm} runs",
        f"[compare] {len(p.screen) + confirm} runs, {p.parallel} at a time; the first runs alone to time them",
    ]


def run_quick(p: SimpleNamespace, command: str) -> int:
    for line in describe(p):
        print(line, flush=True)
    if not p.has_test:
        print(f"[compare] {NO_TEST}", flush=True)
    t0 = time.time()
    runner = Runner(p, len(p.screen) + len(p.arms) * len(p.seeds))
    chosen = {n: p.arm_lrs.get(n, p.lrs)[0] for n in p.arms}  # the arms with one rate
    screen = {"rows": [], "cells": [], "warnings": [], "table": ""}
    if p.screen:
        results = runner.run("screen", p.screen, p.screen_common, p.screen_root)
        rows, masks = _rows(p, results, ("eval",))
        cells, table, warnings = summarise(rows, masks, "eval")
        screen = {"rows": rows, "cells": cells, "warnings": [f"screen: {w}" for w in warnings], "table": table}
        chosen.update({c["selection"]: c["lr"] for c in cells})
    print("[compare] chosen rates: " + ", ".join(f"{n} {chosen[n]:g}" for n in p.arms), flush=True)
    todo = [
        a for n in p.arms for a in arms([p.budget], p.seeds, [chosen[n]], [n], p.steps, p.warmup)
    ]  # arm by arm, seeds paired
    results = runner.run("confirm", todo, p.common, p.out_root)
    rows, masks = _rows(p, results, ("eval", "test") if p.has_test else ("eval",))
    cells, table, warnings = summarise(rows, masks, p.split, grid_warnings=False)
    warnings = screen["warnings"] + warnings
    out = verdict(cells, p.rule, _plain_name(p))
    for w in warnings:
        print(f"[compare] warning: {w}", flush=True)
    meta = _meta(
        p, command, t0, results, quick=True, screen_seeds=p.screen_seeds, budget=p.budget["name"], chosen=chosen
    )
    markdown = (
        (f"Screen (validation, chooses each arm's rate):\n\n{screen['table']}\n" if p.screen else "")
        + f"Confirmation ({p.split} split, each arm at its chosen rate):\n\n{table}\n"
        + ("" if p.has_test else f"{NO_TEST}\n\n")
        + f"{out['random_line']}\n\n{out['line']}\n"
    )
    payload = {
        "rows": rows,
        "cells": cells,
        "warnings": warnings,
        "screen": {k: v for k, v in screen.items() if k != "table"},
        "verdict": out,
    }
    stem = _write(p, meta, payload, markdown, rows, cells)
    print(table, flush=True)
    print(f"[compare] wrote {stem}.{{json,md,png}} in {meta['wall_seconds'] / 60:.1f} min", flush=True)
    if not p.has_test:
        print(f"[compare] {NO_TEST}", flush=True)
    print(out["random_line"], flush=True)
    print(out["line"], flush=True)
    return 0


def run(args, prog: str = "fishds compare", repo: Path | None = None, command: str | None = None) -> int:
    """The comparison of parsed `args` (add_arguments); bad input: one line `PROG: error: ...` and 2, before any
    run starts; a failed run: the same line naming its log, and 1."""
    command = command or " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    try:
        p = plan(args, repo)
    except (CompareError, ConfigError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run_quick(p, command) if p.quick else run_matrix(p, command)
    except RuntimeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0]))


def main(argv=None, repo: Path | None = None) -> int:
    """`python bench/compare.py ...` (repo: that checkout) or `python -m fishds.compare ...`."""
    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # usage errors (argparse printed them) and --help, as a return code
        return e.code if isinstance(e.code, int) else 2
    command = None if argv is None else " ".join([ap.prog] + list(argv))
    return run(args, prog=ap.prog, repo=repo, command=command)


if __name__ == "__main__":
    sys.exit(main())

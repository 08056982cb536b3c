"""Paired contrasts between arms of one or more `fishds compare` result files, Holm-corrected.

    python bench/paired_contrasts.py --results bench/results/confirm-rt-minilm-structured.json \
        bench/results/confirm-rt-minilm-structured-atrained.json \
        --primary "grad/rank - dense" "fisher/row - random/row" \
        --secondary "grad/rank - rt-minilm-structured-atrained:dense" ... [--out FILE.md]

An arm is `ARM` (in the first file) or `TASK:ARM` with TASK a file's task (its meta.task). Arms of different files are
paired by seed (the same train.seed and fish.seed: the same data order and head initialisation). The primary
contrasts form one Holm family (step-down at 5%: the p-values in ascending order against 0.05/m, 0.05/(m-1), ...;
each contrast's adjusted p and its interval at the level Holm assigns it); secondary contrasts get plain 95%
intervals. Per arm: the metric's mean, std, the chosen rate and the masks' coverage of lora_B rows and columns.
Accuracies are shown in points; a loss or perplexity (`fishds compare --metric loss`) in its own units, with each
difference and interval also relative to B's mean (lower is better: a rule helps when its interval lies below 0).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
from pathlib import Path


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(level: float, df: int) -> float:
    """The two-sided `level` quantile of Student's t (bisection on t_two_sided_p)."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > 1 - level:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def holm(pvalues: list[float], alpha: float = 0.05) -> list[tuple[float, float, bool]]:
    """Holm step-down: per test, (adjusted p, the familywise level its interval is drawn at, rejected)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out: list = [None] * m
    running, stop = 0.0, False
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        level = 1 - alpha / (m - rank)
        rejected = not stop and pvalues[i] <= alpha / (m - rank)
        stop = stop or not rejected
        out[i] = (running, level, rejected)
    return out


PERCENT = ("accuracy", "token_acc")  # shown in points (x 100); a loss or perplexity in its own units


def load(paths: list[str], budget: str | None = None) -> tuple[dict, dict, str, str]:
    """arm key -> {seed: value} and arm key -> its cell, over the files (first file: bare arm names), of one budget
    (`budget`, needed when a file holds several); the metric they share and the first file's split."""
    values, cells, metrics, splits = {}, {}, set(), []
    for n, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        task = data["meta"]["task"]
        metric = data["meta"].get("metric", "accuracy")
        metrics.add(metric)
        prefix = "" if n == 0 else task + ":"
        split = data["meta"]["split"]
        splits.append(split)
        budgets = {c["budget"] for c in data["cells"]}
        if budget is None and len(budgets) > 1:
            raise SystemExit(f"{path} holds budgets {sorted(budgets)}: choose one with --budget")
        for cell in data["cells"]:
            if budget is not None and cell["budget"] != budget:
                continue
            key = prefix + cell["selection"]
            cells[key] = cell
            rows = [
                r
                for r in data["rows"]
                if r["selection"] == cell["selection"]
                and r["budget"] == cell["budget"]
                and r["lr"] == cell["lr"]
                and r["split"] == split
            ]
            values[key] = {r["seed"]: (100 if metric in PERCENT else 1) * r["value"] for r in rows}
    if len(metrics) > 1:
        raise SystemExit(f"the files compare different metrics ({', '.join(sorted(metrics))}): pair one metric")
    return values, cells, metrics.pop(), splits[0]


def contrast(values: dict, spec: str) -> dict:
    """A - B paired by seed; `base` is B's mean over the paired seeds (for a relative difference)."""
    a, b = (s.strip() for s in spec.split(" - "))
    seeds = sorted(set(values[a]) & set(values[b]))
    d = [values[a][s] - values[b][s] for s in seeds]
    mean, sd, n = statistics.mean(d), statistics.stdev(d), len(d)
    t = mean / (sd / math.sqrt(n)) if sd > 0 else math.inf
    base = statistics.mean(values[b][s] for s in seeds)
    p = t_two_sided_p(abs(t), n - 1) if sd > 0 else 0.0
    return {"spec": spec, "mean": mean, "sd": sd, "n": n, "p": p, "base": base}


def relative(c: dict, lo: float, hi: float) -> str:
    """The difference and its interval as a percentage of the control's mean (a loss's relative change)."""
    return f"{100 * c['mean'] / c['base']:+.2f}% [{100 * lo / c['base']:+.2f}%, {100 * hi / c['base']:+.2f}%]"


def interval(c: dict, level: float) -> tuple[float, float]:
    half = t_quantile(level, c["n"] - 1) * c["sd"] / math.sqrt(c["n"])
    return c["mean"] - half, c["mean"] + half


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", nargs="+", required=True)
    ap.add_argument("--primary", nargs="+", required=True)
    ap.add_argument("--secondary", nargs="*", default=[])
    ap.add_argument("--budget", help="the budget to read (a file may hold several, e.g. p1:64:1)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    values, cells, metric, split = load(args.results, args.budget)
    points = metric in PERCENT  # else a loss / perplexity: 4 decimals, lower is better, a relative column
    num, fmt, unit = ("{:.2f}", "{:+.2f}", "points") if points else ("{:.4f}", "{:+.4f}", metric)
    rel_head, rel_rule = ("", "") if points else (" relative to B |", "---|")
    lines = [
        f"| arm | lr | {split} {metric}: mean ± std (min–max) | seeds | lora_B rows / cols covered |",
        "|---|---|---|---|---|",
    ]
    for key, cell in cells.items():
        v = list(values[key].values())
        cov = ((cell.get("mask") or {}).get("coverage") or {}).get("lora_B") or {}
        share = f"{cov.get('row_share', 0):.2f} / {cov.get('col_share', 0):.2f}" if cov else "–"
        lines.append(
            f"| {key} | {cell['lr']:g} | {num.format(statistics.mean(v))} ± {num.format(statistics.stdev(v))} "
            f"({num.format(min(v))}–{num.format(max(v))}) | {len(v)} | {share} |"
        )
    prim = [contrast(values, s) for s in args.primary]
    lines += ["", "Primary contrasts A - B (Holm over the family at 5%; interval at the level Holm assigns):", ""]
    lines += [
        f"| contrast | Δ {unit} | interval | level | p | Holm p | rejects 0 |{rel_head}",
        f"|---|---|---|---|---|---|---|{rel_rule}",
    ]
    for c, (padj, level, rejected) in zip(prim, holm([c["p"] for c in prim])):
        lo, hi = interval(c, level)
        rel = "" if points else f" {relative(c, lo, hi)} |"
        lines.append(
            f"| {c['spec']} | {fmt.format(c['mean'])} | [{fmt.format(lo)}, {fmt.format(hi)}] | {100 * level:.1f}% | "
            f"{c['p']:.3f} | {padj:.3f} | {'yes' if rejected else 'no'} |{rel}"
        )
    if args.secondary:
        lines += ["", "Secondary contrasts A - B (95% t-intervals, not corrected):", ""]
        lines += [f"| contrast | Δ {unit} | 95% interval | p |{rel_head}", f"|---|---|---|---|{rel_rule}"]
        for c in (contrast(values, s) for s in args.secondary):
            lo, hi = interval(c, 0.95)
            rel = "" if points else f" {relative(c, lo, hi)} |"
            lines.append(
                f"| {c['spec']} | {fmt.format(c['mean'])} | [{fmt.format(lo)}, {fmt.format(hi)}] | {c['p']:.3f} |{rel}"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        command = shlex.join(["python", "bench/paired_contrasts.py", *(argv or sys.argv[1:])])
        Path(args.out).write_text(f"`{command}`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

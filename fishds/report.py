"""A one-page picture of a run's FISH mask: `write_report_png(output_dir)` -> output_dir/fish_mask_report.png.

Reads fish_mask.safetensors (the masks, see mask.py) and fish_report.json (fish_selection.json when the run
has not finished) and draws, with matplotlib's Agg canvas (no display, no pyplot state):

1. a heatmap of the selected fraction per (module type x layer), plus an "all" row (per layer) and the
   per-module fraction in the row labels;
2. the selected fraction of lora_A / lora_B (and "other" tensor kinds) per module type, as grouped bars;
3. the Fisher score distribution (`score_stats.log10_histogram`, zeros as their own bar) with the
   selection threshold `threshold_score`; random, dense and mask-file selections have no scores and say so;
4. a title with the selection, k / pool size and the lora_A / lora_B share of the mask.

Any PEFT method's keys work: the layer is the N of `layers.N` (or `h.N`, `blocks.N`, ...; "other" when
there is none), the module type is the name before the adapter tensor (`q_proj` in
`...q_proj.lora_A.weight`, `...q_proj.ia3_l`, `...o_proj.bottleneck.down.weight`), and tensor kinds other
than lora_A / lora_B count as "other".
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .files import MASK_FILE, REPORT_FILE, REPORT_PNG, SELECTION_REPORT
from .fish.keys import KINDS, OTHER, parse_key

REPORT_FILES = (REPORT_FILE, SELECTION_REPORT)  # finished run first, then the mask-time report

MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _read_report(out: Path) -> dict:
    for name in REPORT_FILES:
        if (out / name).is_file():
            try:
                return json.loads((out / name).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{out / name} is not valid JSON ({e})") from None
    raise FileNotFoundError(f"{out}: no {REPORT_FILES[0]} (nor {REPORT_FILES[1]}); is it a fishds output_dir?")


def mask_counts(masks: dict) -> dict:
    """Selected / total counts per (layer, module), per (module, kind) and overall, from boolean masks."""
    cells, kinds = {}, {}
    for key, m in masks.items():
        info = parse_key(key)
        sel, n = int(m.sum()), int(m.numel())
        for table, idx in ((cells, (info.layer, info.module)), (kinds, (info.module, info.kind))):
            c = table.setdefault(idx, [0, 0])
            c[0] += sel
            c[1] += n
    return {"cells": cells, "kinds": kinds}


def _module_order(modules) -> list[str]:
    known = [m for m in MODULE_ORDER if m in modules]
    return known + sorted(m for m in modules if m not in MODULE_ORDER)


def _layer_order(layers) -> list:
    return sorted(x for x in layers if x != OTHER) + ([OTHER] if OTHER in layers else [])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.9995 or x == 1 else "99.9%"


def write_report_png(output_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Draw the mask report of a fishds output_dir; returns the PNG path (default output_dir/fish_mask_report.png).

    Raises FileNotFoundError (missing folder or file) or ValueError (unreadable file), naming the path.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder")
    if not (out / MASK_FILE).is_file():
        raise FileNotFoundError(f"{out}: no {MASK_FILE}; is it a fishds output_dir?")
    report = _read_report(out)
    from .fish.mask import load_masks

    try:
        masks = load_masks(out / MASK_FILE)
    except OSError as e:
        raise ValueError(f"{out / MASK_FILE}: cannot be read ({e})") from None
    if not masks:
        raise ValueError(f"{out / MASK_FILE} holds no masks")
    counts = mask_counts(masks)
    fig = _draw(report, counts, title_dir=out.resolve().name)
    target = Path(out_path) if out_path is not None else out / REPORT_PNG
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def _title(report: dict, counts: dict, title_dir: str) -> str:
    total_sel = sum(c[0] for c in counts["cells"].values())
    total = sum(c[1] for c in counts["cells"].values())
    k = report.get("k", total_sel)
    pool = report.get("pool_size", total)
    by_kind = {kd: sum(c[0] for (_, kk), c in counts["kinds"].items() if kk == kd) for kd in KINDS}
    share = "  ".join(
        f"{kd} {_pct(v / total_sel) if total_sel else 'n/a'}" for kd, v in by_kind.items() if kd != OTHER or v
    )
    method = f"  |  method {report['method']}" if report.get("method") else ""
    ratio = f" ({_pct(k / pool)})" if pool else ""
    return (
        f"{title_dir}  |  selection {report.get('selection', '?')}{method}  |  "
        f"k {k:,} / pool {pool:,}{ratio}  |  share of mask: {share}"
    )


def _draw(report: dict, counts: dict, title_dir: str):
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    cells, kinds = counts["cells"], counts["kinds"]
    layers = _layer_order({layer for layer, _ in cells})
    modules = _module_order({mod for _, mod in cells})
    n_rows = len(modules) + 1  # + "all modules"

    width = float(min(max(12.0, 0.42 * len(layers) + 3.5), 30.0))
    heat_h = 0.5 * n_rows + 1.3
    fig = Figure(figsize=(width, heat_h + 4.6), layout="constrained")
    gs = fig.add_gridspec(2, 2, height_ratios=[heat_h, 4.6], width_ratios=[1, 1])
    fig.suptitle(_title(report, counts, title_dir), fontsize=11)

    # 1. heatmap: module rows (+ all), layer columns
    ax = fig.add_subplot(gs[0, :])
    grid = np.full((n_rows, len(layers)), np.nan)
    for (layer, mod), (sel, n) in cells.items():
        grid[modules.index(mod), layers.index(layer)] = sel / n if n else np.nan
    for j, layer in enumerate(layers):
        sel = sum(c[0] for (la, _), c in cells.items() if la == layer)
        n = sum(c[1] for (la, _), c in cells.items() if la == layer)
        grid[-1, j] = sel / n if n else np.nan
    cmap = colormaps["viridis"].with_extremes(bad="#e0e0e0")  # grey: no such module in that layer
    finite = grid[~np.isnan(grid)]
    vmax = min(1.0, max(0.1, math.ceil(10 * float(finite.max())) / 10)) if finite.size else 1.0  # contrast
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.axhline(len(modules) - 0.5, color="white", linewidth=3)
    row_labels = []
    for mod in modules:
        sel = sum(c[0] for (_, m), c in cells.items() if m == mod)
        n = sum(c[1] for (_, m), c in cells.items() if m == mod)
        row_labels.append(f"{mod} ({_pct(sel / n) if n else 'n/a'})")
    row_labels.append("all modules")
    ax.set_yticks(range(n_rows), row_labels, fontsize=9)
    step = max(1, math.ceil(len(layers) / 60))
    ax.set_xticks(range(0, len(layers), step), [str(la) for la in layers[::step]], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(
        "selected % per layer and module type (cell: all adapter tensors of that module in that layer; "
        "row label: the whole module type)",
        fontsize=10,
    )
    if grid.size <= 600 and len(layers) <= 64:
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(
                    j,
                    i,
                    f"{100 * v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=7 if len(layers) > 24 else 8,
                    color="white" if v < 0.6 * vmax else "black",
                )
    cb = fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.set_label("selected fraction")

    # 2. lora_A / lora_B / other per module type
    ax = fig.add_subplot(gs[1, 0])
    present = [kd for kd in KINDS if any(kk == kd for _, kk in kinds)]
    colors = {"lora_A": "#4c72b0", "lora_B": "#dd8452", OTHER: "#55a868"}
    bar_w = 0.8 / max(1, len(present))
    x = np.arange(len(modules))
    for i, kd in enumerate(present):
        vals = [kinds[(m, kd)][0] / kinds[(m, kd)][1] if kinds.get((m, kd), [0, 0])[1] else np.nan for m in modules]
        pos = x - 0.4 + bar_w * (i + 0.5)
        bars = ax.bar(pos, np.nan_to_num(vals), bar_w, label=kd, color=colors[kd])
        for b, v in zip(bars, vals):
            if not np.isnan(v) and len(modules) * len(present) <= 40:
                ax.annotate(
                    f"{100 * v:.0f}%",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                )
    ax.set_xticks(x, modules, rotation=30 if len(modules) > 5 else 0, fontsize=9)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("selected fraction of the tensors")
    ax.set_title("selected fraction by tensor kind", fontsize=10)
    ax.legend(fontsize=8, loc="upper right", ncols=len(present))
    ax.grid(axis="y", alpha=0.3)

    # 3. Fisher score distribution
    _draw_scores(fig.add_subplot(gs[1, 1]), report)
    return fig


def _draw_scores(ax, report: dict) -> None:
    import numpy as np

    stats = report.get("score_stats")
    hist = (stats or {}).get("log10_histogram") or {}
    edges, hcounts = hist.get("edges"), hist.get("counts")
    ax.set_title("Fisher score distribution (log10 bins)", fontsize=10)
    if not stats or not edges or not hcounts or len(edges) != len(hcounts) + 1:
        ax.set_axis_off()
        if stats:
            lines = ["no score histogram in the report"] + [
                f"{k}: {stats[k]:.4g}" for k in ("mean", "max") if isinstance(stats.get(k), (int, float))
            ]
            if isinstance(stats.get("zeros"), (int, float)):
                lines.append(f"zero scores: {int(stats['zeros']):,}")
        else:
            lines = [f"no Fisher scores (selection: {report.get('selection', '?')})"]
        if isinstance(report.get("threshold_score"), (int, float)):
            lines.append(f"threshold score: {report['threshold_score']:.4g}")
        ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=10, transform=ax.transAxes)
        return
    edges = [float(e) for e in edges]
    widths = np.diff(edges)
    zeros = int(stats.get("zeros", 0) or 0)
    nonzero_bins = [i for i, c in enumerate(hcounts) if c]
    lo = edges[nonzero_bins[0]] if nonzero_bins else edges[0]
    hi = edges[nonzero_bins[-1] + 1] if nonzero_bins else edges[-1]
    thr = report.get("threshold_score")
    thr = float(thr) if isinstance(thr, (int, float)) and math.isfinite(thr) else None
    if thr is not None and thr > 0:
        lo, hi = min(lo, math.floor(math.log10(thr))), max(hi, math.ceil(math.log10(thr)))
    zero_x = lo - 1.5  # the zeros get their own bar, just left of the smallest positive bin
    ax.bar(
        edges[:-1], hcounts, widths, align="edge", color="#4c72b0", edgecolor="white", linewidth=0.5, label="scores > 0"
    )
    if zeros:
        ax.bar([zero_x], [zeros], 1.0, color="#999999", edgecolor="white", label=f"score = 0 ({zeros:,})")
    left = zero_x - 0.7 if zeros or thr == 0 else lo - 0.5
    if thr is not None:
        lowest = report.get("selection") == "lowest"
        ax.axvline(
            math.log10(thr) if thr > 0 else zero_x,
            color="#c44e52",
            linewidth=2,
            label=f"threshold {thr:.3g} (selected {'<=' if lowest else '>='})",
        )
    ax.set_xlim(left, hi + 0.5)
    ticks = list(range(math.ceil(lo), math.floor(hi) + 1))
    if len(ticks) > 12:
        ticks = ticks[:: math.ceil(len(ticks) / 12)]
    labels = [f"$10^{{{t}}}$" for t in ticks]
    if zeros or thr == 0:
        ticks, labels = [zero_x] + ticks, ["0"] + labels
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("Fisher score (sum of squared gradients)")
    ax.set_ylabel("entries")
    extra = [f"{k} {stats[k]:.3g}" for k in ("mean", "max") if isinstance(stats.get(k), (int, float))]
    if extra:
        ax.set_title(f"Fisher score distribution (log10 bins; {', '.join(extra)})", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)

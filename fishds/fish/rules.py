"""A selection rule = a score (fishds/fish/scores.py) + an allocation (fishds/fish/allocation.py) + a control.

    select_local: score this rank's chunk -> keys -> groups and quotas -> exact_topk_grouped -> control

Controls (`fish.control`, a table, name -> Control) are the arms a comparison needs beside a rule:
- none: the rule itself;
- random_matched: the rule's mask is computed, then replaced by random entries with the same count in every pool
  tensor (what the rule's allocation alone is worth); for a structured allocation (rank, row) random choices of the
  same structure: r_keep random components per module, m random entries per row;
- bottom: the rule's order reversed, its lowest-scored entries (or components) instead of its highest: if the
  score means anything, this arm must lose;
- random_b_only: random entries of the lora_B tensors only, k shared over them in proportion to their size; lora_A
  stays fixed at its initialisation (a random projection). `fish.pool_include: [lora_B]` is NOT this: tensors left
  out of the pool train fully (they count as always-trained, like a head), so lora_A would train densely;
- head_only: classification only; k = 0, no pool entry trains, only the head (which is outside the pool).

Everything stays distributed: every rank holds only its chunk of the scores, and group sums and counts travel as
small all-reduces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch

from ..schema import ConfigError
from .allocation import ALLOCATIONS, AllocationContext, proportional_quotas, selected_per_tensor, tensor_groups
from .keys import kind_of
from .pool import Pool
from .scores import SCORES, ScoreContext, local_scores
from .select import exact_topk_grouped, key_to_float, random_keys


def rule_of(fish) -> SimpleNamespace:
    """score, allocation and control of a fish config section (or the HF callback's stand-in without them)."""
    score = getattr(fish, "score", None) or fish.selection
    return SimpleNamespace(
        score=score, allocation=getattr(fish, "allocation", "global"), control=getattr(fish, "control", "none")
    )


# ---- the rule grammar: one name per rule, used by the config, the reports and bench/compare.py -----------------
#     dense | CONTROL (a control that runs no rule: random_b_only, head_only) | SCORE[/ALLOCATION][+CONTROL]
# /global and +none are left out of names.


def name_of(score: str | None, allocation: str = "global", control: str = "none") -> str:
    """The name of a rule (score None: dense, no mask)."""
    if score is None:
        return "dense"
    if not CONTROLS[control].runs_rule:
        return control
    name = score if allocation == "global" else f"{score}/{allocation}"
    return name + ("" if control == "none" else f"+{control}")


def label(fish) -> str:
    """The selection's name in reports (name_of of the section's rule)."""
    if fish.selection == "dense":
        return "dense"
    r = rule_of(fish)
    return name_of(r.score, r.allocation, r.control)


GRAMMAR = "dense, a control that runs no rule, or SCORE[/ALLOCATION][+CONTROL]"


def parse(name: str) -> dict[str, str]:
    """A rule name (name_of's grammar) -> the `fish:` fields it sets ({"selection": "dense"}, or score, allocation
    and control). ValueError naming the grammar and the table entries for a name that is none."""
    if name == "dense":
        return {"selection": "dense"}
    if name in CONTROLS and not CONTROLS[name].runs_rule:
        return {"score": "random", "allocation": "global", "control": name}
    rest, _, control = name.partition("+")
    score, _, allocation = rest.partition("/")
    allocation, control = allocation or "global", control or "none"
    if (
        score not in SCORES
        or allocation not in ALLOCATIONS
        or control not in CONTROLS
        or not CONTROLS[control].runs_rule
    ):
        raise ValueError(
            f"rule {name!r}: write {GRAMMAR} (scores {', '.join(SCORES)}; allocations {', '.join(ALLOCATIONS)}; "
            f"controls {', '.join(CONTROLS)})"
        )
    return {"score": score, "allocation": allocation, "control": control}


def needs_pass(fish) -> bool:
    """Whether the rule runs the scoring pass (fish.num_samples examples)."""
    r = rule_of(fish)
    return fish.selection != "dense" and CONTROLS[r.control].runs_rule and SCORES[r.score].needs_pass


@dataclass(frozen=True, kw_only=True)
class Control:
    """One `fish.control`: its doc (the config reference's line) and what it needs, from which FishSection and
    fishds/fish/config.check_run derive their checks."""

    name: str
    doc: str
    apply: Callable  # (pool, k, start, end, rule's local selection or None, fish, info, actx) -> local selection
    runs_rule: bool = True  # the rule's own mask is computed first (the scoring pass runs)
    needs_scored_rule: str | None = None  # why a random score cannot be its rule, or None
    needs_lora_ab: bool = False  # lora_A / lora_B tensors (fishds/methods.py PeftMethod.lora_ab)
    needs_classification: bool = False  # a classification head (data.format=classification)
    trains_pool: bool = True  # False: k = 0, no pool entry trains
    reverse: bool = False  # the rule runs on reversed keys (its lowest-ranked entries)


def _none(pool, k, start, end, selected, fish, info, actx=None):
    return selected


def _random_with(pool, start, end, quotas, fish):
    keys = random_keys(start, end, fish.seed)
    return exact_topk_grouped(keys, tensor_groups(pool, start, end), quotas)[0]


def _random_matched(pool, k, start, end, selected, fish, info, actx=None):
    quotas = selected_per_tensor(pool, start, end, selected)
    info["rule_share"] = _share(pool, quotas)
    allocation = ALLOCATIONS[rule_of(fish).allocation]
    if allocation.select is not None:  # structured: the same structure, random choices
        return allocation.random_like(actx)
    return _random_with(pool, start, end, quotas, fish)


def _random_b_only(pool, k, start, end, selected, fish, info, actx=None):
    caps = [t.numel if kind_of(t.name) == "lora_B" else 0 for t in pool.tensors]
    if k > sum(caps):
        raise ConfigError(
            f"fish.control=random_b_only: k={k} exceeds the {sum(caps)} lora_B entries of the pool; "
            "lower fish.keep_ratio / fish.num_selected"
        )
    return _random_with(pool, start, end, proportional_quotas(k, caps, caps), fish)


def _head_only(pool, k, start, end, selected, fish, info, actx=None):
    return torch.zeros(end - start, dtype=torch.bool)


CONTROLS: dict[str, Control] = {
    c.name: c
    for c in (
        Control(name="none", doc="the rule itself", apply=_none),
        Control(
            name="random_matched",
            doc="random entries with the per-tensor counts of the rule fish.score + fish.allocation",
            apply=_random_matched,
            needs_scored_rule="takes the per-tensor counts of a scored rule",
        ),
        Control(
            name="bottom",
            doc="the rule's lowest-ranked entries (or rank components) instead of its highest: a score that means "
            "anything must beat it",
            apply=_none,
            reverse=True,
            needs_scored_rule="reverses a scored rule's order",
        ),
        Control(
            name="random_b_only",
            doc="random entries of lora_B tensors only, lora_A stays at init",
            apply=_random_b_only,
            runs_rule=False,
            needs_lora_ab=True,
        ),
        Control(
            name="head_only",
            doc="classification: no pool entry trains, only the head; k = 0",
            apply=_head_only,
            runs_rule=False,
            needs_classification=True,
            trains_pool=False,
        ),
    )
}


def _share(pool: Pool, per_tensor: list[int]) -> dict:
    total = sum(per_tensor)
    out = {}
    for t, n in zip(pool.tensors, per_tensor):
        out[kind_of(t.name)] = out.get(kind_of(t.name), 0) + n
    return {kind: n / total if total else 0.0 for kind, n in out.items()}


def select_local(ctx: ScoreContext, k: int) -> torch.Tensor:
    """This rank's boolean selection of its chunk under the configured rule; fills ctx.info."""
    fish, pool, info = ctx.fish, ctx.pool, ctx.info
    r = rule_of(fish)
    control = CONTROLS[r.control]
    info.update(score=r.score, allocation=r.allocation, control=r.control)
    selected = actx = None
    if control.runs_rule:
        score = SCORES[r.score]
        values = local_scores(score, ctx)
        keys = score.keys(values)
        if control.reverse:
            keys = -keys - 1
        if not score.is_random:
            info["score_stats"] = score_stats(values)
        t0 = time.perf_counter()
        actx = AllocationContext(
            pool,
            k,
            ctx.start,
            ctx.end,
            None if score.is_random else values,
            keys,
            fish,
            info,
            reverse=control.reverse,
            component_power=score.component_power,
        )
        selected, thresholds = ALLOCATIONS[r.allocation].local_selection(actx)
        info["select_seconds"] = time.perf_counter() - t0
        if r.allocation == "global" and not score.is_random and not control.reverse:
            t = thresholds[0]
            info["threshold_score"] = key_to_float(-t - 1 if score.lowest else t)
        ctx.values = values
    else:
        info["collect_seconds"] = 0.0
    t0 = time.perf_counter()
    out = control.apply(pool, k, ctx.start, ctx.end, selected, fish, info, actx)
    info["select_seconds"] = info.get("select_seconds", 0.0) + time.perf_counter() - t0
    return out


def score_stats(local: torch.Tensor) -> dict:
    """Sum, mean, max, count of zeros and a log10 histogram of the scores, reduced over ranks (no gather)."""
    from .. import dist as fdist

    s = torch.tensor([float(local.sum()), float(local.numel()), float((local == 0).sum())], dtype=torch.float64)
    fdist.all_reduce_(s)
    mx = torch.tensor([float(local.max()) if local.numel() else 0.0])
    fdist.all_reduce_(mx, op=torch.distributed.ReduceOp.MAX)
    edges = list(range(-20, 6))  # log10 bin edges; bin i holds scores in [10^edges[i], 10^edges[i+1])
    pos = local[local > 0].double().log10().clamp(edges[0], edges[-1] - 1e-9)
    hist = torch.histc(pos, bins=len(edges) - 1, min=edges[0], max=edges[-1]).to(torch.float64)
    fdist.all_reduce_(hist)
    return {
        "sum": float(s[0]),
        "mean": float(s[0] / s[1]),
        "max": float(mx[0]),
        "zeros": int(s[2]),
        "log10_histogram": {"edges": edges, "counts": [int(c) for c in hist]},
    }

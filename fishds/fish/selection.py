"""Selection rules and the flow that fixes a FISH mask, independent of any training loop.

A selection rule is a score (fishds/fish/scores.py SCORES), an allocation of k (fishds/fish/allocation.py
ALLOCATIONS) and an optional control arm (fishds/fish/rules.py CONTROLS), each a table: adding one is one entry
there. RULES here is the table of `fish.selection` shorthands (fisher, random, lowest, dense). FishSection
(fishds/fish/config.py, the `fish:` section of `fishds train` and of the Hugging Face callback) takes its choices
and their documentation from these tables.

The front door, called on every rank by both clients (fishds/run/train.py and fishds/integrations/hf.py) once
the engine exists (and after any dense warm-up, which each client runs its own way): `fix_mask`, i.e.
    load_mask_for_pool (a mask file of an earlier run)
    or scoring_examples -> select_masks (score -> groups and quotas -> exact distributed top-k -> masks on every
       rank) -> (after a dense warm-up: enforce.reset_unselected)
    -> publish_mask (full masks, report, files on rank 0) -> MaskEnforcer (none for dense) -> the banner line.
k comes from `budget`, the one place that computes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist as fdist
from ..files import MASK_FILE, SCORES_FILE, SELECTION_REPORT, write_json
from ..schema import ConfigError
from . import rules
from .adapter import gather_adapter, key_map, mask_report, save_initial_adapter, save_mask_file
from .allocation import ALLOCATIONS
from .compact import apply_mask as apply_compact_mask
from .enforce import MaskEnforcer, reset_unselected
from .fisher import gather_scores
from .mask import PackedMasks, share_selection
from .pool import Pool
from .rules import score_stats
from .scores import ScoreContext


@dataclass(frozen=True)
class Rule:
    """One `fish.selection` shorthand: its score (fishds/fish/scores.py SCORES) with the global allocation, or
    dense (no mask: k = the whole pool, nothing is enforced, plain PEFT). fish.score / fish.allocation /
    fish.control (fishds/fish/rules.py) refine it."""

    doc: str  # one line for the config reference
    dense: bool = False


RULES: dict[str, Rule] = {
    "fisher": Rule("top-k empirical Fisher (the paper)"),
    "random": Rule("k entries at random (ablation)"),
    "lowest": Rule("the k lowest Fisher scores (ablation)"),
    "dense": Rule("plain PEFT, no mask", dense=True),
}


def rule(name: str) -> Rule:
    return RULES[name]


def budget(fish, pool: Pool, trainable: int, baselines: dict[int, int] | None = None) -> dict:
    """k, and the plain-PEFT baselines it compares with (../shared/FISH_TUNING.md section 1): the one place k is
    computed. pool: the tensors the mask selects in; trainable: the count of every trainable entry (tensors outside
    the pool train fully and count towards the budget); baselines: plain-PEFT rank -> trainable count, counted by
    fishds/run/preflight.py (fish.budget=match_rank needs the one of fish.match_r). Raises ConfigError."""
    always = trainable - pool.size
    out = {"protocol": fish.budget, "pool": pool.size, "always_trained": always, "dense_same_rank": trainable}
    baselines = baselines or {}
    if rule(fish.selection).dense:
        k = pool.size
    elif not rules.CONTROLS[rules.rule_of(fish).control].trains_pool:  # head_only: only the head trains
        out.update(k=0, trainable=always)
        return out
    elif fish.budget == "match_rank":  # protocol 1: rank r masked down to the count of plain rank match_r
        if fish.match_r not in baselines:
            raise ConfigError(
                f"fish.budget=match_rank needs the trainable count of plain rank fish.match_r={fish.match_r}, "
                "which only `fishds train` counts; give fish.keep_ratio or fish.num_selected"
            )
        k = baselines[fish.match_r] - always
        out.update(baseline_r=fish.match_r, baseline_trainable=baselines[fish.match_r])
    else:
        k = pool.num_selected(fish.keep_ratio, fish.num_selected)
        for br, count in baselines.items():  # protocol 2: rank r at keep p vs plain rank r*p
            out.update(baseline_r=br, baseline_trainable=count)
    if not 1 <= k <= pool.size:
        raise ConfigError(f"the budget gives k={k}, outside 1..{pool.size} (pool) for fish.budget={fish.budget}")
    allocation = ALLOCATIONS[rules.rule_of(fish).allocation]
    if allocation.check is not None and rules.CONTROLS[rules.rule_of(fish).control].runs_rule:
        out[f"{allocation.name}_keep"] = allocation.check(pool, k)  # r_keep or m; ConfigError when k cannot fit
    out.update(k=k, trainable=k + always)
    return out


def scoring_examples(fish, examples) -> list:
    """The N examples the Fisher pass uses: a fish.seed permutation of the examples, first N."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(fish.seed)).tolist()
    return [examples[i] for i in order[: fish.num_samples]]


def progress_bar(total: int, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise disabled (progress lines are printed instead)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (fdist.is_main() and sys.stderr.isatty()), dynamic_ncols=True)


def select_masks(
    fish,
    engine,
    pool: Pool,
    k: int,
    examples,
    collate,
    micro_batch_size: int,
    scores_dir: Path | None = None,
    initial: dict | None = None,
) -> tuple[dict, dict]:
    """The rule's scores -> groups and quotas -> exact distributed top-k -> full masks on every rank, with report
    entries (fishds/fish/rules.py: score x allocation x control).

    fish: the `fish:` section (fishds/fish/config.FishSection); examples: the scoring examples (see scoring_examples);
    scores_dir: where fish.save_scores writes the gathered scores; initial: the adapter before a dense warm-up
    (movement scores)."""
    info = {"selection": rules.label(fish), "pool_size": pool.size, "k": k}
    if rule(fish.selection).dense:
        return {t.name: torch.ones(t.shape, dtype=torch.bool) for t in pool.tensors}, info
    bar = progress_bar(0, f"scoring pass ({fish.granularity})")

    def advance(done: int, total: int):
        bar.total = total
        bar.update(1)

    start, end = pool.chunk(fdist.rank(), fdist.world_size())
    ctx = ScoreContext(fish, micro_batch_size, engine, pool, start, end, examples, collate, initial, advance, info)
    local_sel = rules.select_local(ctx, k)
    bar.close()
    if getattr(fish, "save_scores", False) and scores_dir is not None and ctx.values is not None:
        full = gather_scores(pool, ctx.values)
        if full is not None:
            from safetensors.torch import save_file

            name = SCORES_FILE if info["score"] in ("fisher", "lowest") else f"{info['score']}_scores.safetensors"
            save_file({n: v.contiguous() for n, v in full.items()}, str(Path(scores_dir) / name))
    t0 = time.perf_counter()
    masks = share_selection(pool, local_sel)
    info["select_seconds"] = info.get("select_seconds", 0.0) + time.perf_counter() - t0
    return masks, info


def publish_mask(
    model, trainable: Pool, masks: dict, report: dict, out: Path, save_initial: bool, write: bool = True
) -> PackedMasks:
    """The masks of every trainable tensor (packed, 1 bit per entry; tensors outside the pool train fully: all ones),
    their statistics
    added to `report`, and, with `write`, on rank 0 the mask file, the selection report and the initial adapter.
    All ranks call it (gathering the initial adapter is a collective)."""
    masks = PackedMasks.of(masks).completed([(t.name, t.shape) for t in trainable.tensors])
    report.update(mask_report(trainable, masks))
    fixed = gather_adapter(trainable) if write and save_initial else None
    if write and fdist.is_main():
        save_mask_file(model, out, masks)
        write_json(out / SELECTION_REPORT, report)
        if fixed is not None:
            save_initial_adapter(model, out, fixed)
    return masks


class MaskFileError(ValueError):
    """A mask file that does not fit the adapter (each client re-raises it as its own error type)."""


def load_mask_for_pool(model, pool: Pool, path: str) -> dict[str, torch.Tensor]:
    """A fish_mask.safetensors keyed like the adapter, checked against the pool, keyed by parameter name.
    Raises MaskFileError naming fish.mask_path."""
    from .mask import load_masks

    try:
        by_key = load_masks(path)
    except (OSError, ValueError) as e:
        raise MaskFileError(f"fish.mask_path={path!r}: {e}") from None
    key_of = key_map(model, [t.name for t in pool.tensors])
    missing = sorted(set(key_of.values()) - set(by_key))
    extra = sorted(set(by_key) - set(key_of.values()))
    if missing or extra:
        raise MaskFileError(
            f"fish.mask_path={path!r}: keys do not match the adapter (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was it made with the same model, peft.r and target_modules?"
        )
    masks = {}
    for t in pool.tensors:
        m = by_key[key_of[t.name]]
        if tuple(m.shape) != t.shape:
            raise MaskFileError(
                f"fish.mask_path={path!r}: {key_of[t.name]} has shape {list(m.shape)}, the "
                f"adapter tensor has {list(t.shape)}"
            )
        masks[t.name] = m
    return masks


@dataclass(frozen=True, kw_only=True)
class FixedMask:
    """What fix_mask returns: the masks of every trainable tensor (packed, 1 bit per entry, on the device; the
    enforcer holds the same object), the selection report, and the enforcer (None for dense: nothing is masked)."""

    masks: PackedMasks
    report: dict
    enforcer: MaskEnforcer | None


def fix_mask(
    fish,
    *,
    engine,
    pool: Pool,
    trainable: Pool,
    k: int,
    examples,
    collate,
    micro_batch_size: int,
    out: Path,
    initial: dict | None = None,
    mask_path: str | None = None,
    save_initial: bool = True,
    write: bool = True,
    extra: dict | None = None,
    banner: str = "mask fixed",
) -> FixedMask:
    """The mask's life cycle, the same for `fishds train` and the Hugging Face callback; every rank calls it.

    fish: the `fish:` section (fishds/fish/config.FishSection); engine: the DeepSpeed engine (or the callback's
    stand-in); pool / trainable: the tensors the mask selects in / every trainable tensor; k: from `budget`;
    examples (any indexable of examples, or None with a mask file), collate, micro_batch_size: the scoring pass;
    out: where rank 0 writes the mask file, the selection report and (save_initial) the initial adapter, unless
    write=False; initial: the adapter before a dense warm-up (movement scores, then the unselected entries are reset
    to it with fish.reset_unselected); mask_path: a mask file (fish.mask_path, or a checkpoint's) used instead of
    scoring: training is then masked by it; extra: the client's report fields; banner: the log line's start.
    Raises MaskFileError for a mask file that does not fit the adapter.

    Cost at 7B: what select_masks and publish_mask cost (the scoring pass; 1 bit per trainable entry on every
    rank for the masks; the gathered initial adapter on rank 0 with save_initial); nothing per training step here.
    """
    model = engine.module
    if mask_path:
        masks = load_mask_for_pool(model, trainable, mask_path)
        report = {
            "selection": f"file {mask_path}",
            "pool_size": pool.size,
            "k": sum(int(m.sum()) for m in masks.values()),
        }
    else:
        draw = scoring_examples(fish, examples) if examples is not None and not fish.dense else []
        masks, report = select_masks(fish, engine, pool, k, draw, collate, micro_batch_size, out, initial)
        if initial is not None and fish.reset_unselected:  # after a dense warm-up: unselected entries back
            reset_unselected(engine, pool, masks, initial)
    report["reset_unselected"] = bool(not mask_path and initial is not None and fish.reset_unselected)
    report.update(extra or {})
    masks = publish_mask(model, trainable, masks, report, out, save_initial, write)
    return enforce_mask(fish, engine, trainable, masks, report, banner, masked=bool(mask_path) or not fish.dense)


def enforce_mask(fish, engine, trainable: Pool, masks, report: dict, banner: str, masked: bool) -> FixedMask:
    """Published masks (fix_mask's, or a checkpoint's) packed on the device and, when `masked`, enforced (with
    fish.compact_optimizer, the optimizer's moments cut down to the selected entries); then the banner line."""
    masks = PackedMasks.of(masks, fdist.device())  # 1 bit per entry, held once (the enforcer uses the same object)
    enforcer = None
    if masked:
        enforcer = MaskEnforcer(engine, trainable, masks, restore=not fish.compact_optimizer)
        if fish.compact_optimizer:
            apply_compact_mask(engine, trainable, masks)
    fdist.print0(
        f"[fishds] {banner}: {report['selected']:,}/{trainable.size:,} trainable entries "
        f"(lora_A {report['share'].get('lora_A', 0):.1%}, lora_B {report['share'].get('lora_B', 0):.1%}); "
        f"Fisher pass {report.get('collect_seconds', 0):.1f}s, selection {report.get('select_seconds', 0):.2f}s"
    )
    return FixedMask(masks=masks, report=report, enforcer=enforcer)


__all__ = [
    "RULES",
    "Rule",
    "rule",
    "budget",
    "fix_mask",
    "enforce_mask",
    "FixedMask",
    "scoring_examples",
    "select_masks",
    "score_stats",
    "publish_mask",
    "load_mask_for_pool",
    "MaskFileError",
    "MASK_FILE",
]

"""Selection rules and the flow that fixes a FISH mask, independent of any training loop.

A selection rule is a score (fishds/fish/scores.py SCORES), an allocation of k (fishds/fish/allocation.py
ALLOCATIONS) and an optional control arm (fishds/fish/rules.py CONTROLS), each a table: adding one is one entry
there. RULES here is the table of `fish.selection` shorthands (fisher, random, lowest, dense). config.FishSection
(the `fish:` section of `fishds train` and of the Hugging Face callback) takes its choices and their
documentation from these tables.

The flow, called on every rank by both clients (fishds/run/train.py and fishds/integrations/hf.py):
    scoring_examples -> select_masks (score -> groups and quotas -> exact distributed top-k -> masks on every rank)
    -> (after a dense warm-up: enforce.reset_unselected) -> publish_mask (full masks, report, files on rank 0)
or, instead of scoring, load_mask_for_pool (a mask file of an earlier run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import dist as fdist
from ..files import MASK_FILE, SCORES_FILE, SELECTION_REPORT, write_json
from . import rules
from .adapter import gather_adapter, key_map, mask_report, save_initial_adapter, save_mask_file
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


def allocate_k(fish, pool: Pool) -> int:
    """k for a keep_ratio / num_selected budget (the whole pool for a dense rule)."""
    return pool.size if rule(fish.selection).dense else pool.num_selected(fish.keep_ratio, fish.num_selected)


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

    fish: the `fish:` section (config.FishSection); examples: the scoring examples (see scoring_examples);
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


__all__ = [
    "RULES",
    "Rule",
    "rule",
    "allocate_k",
    "scoring_examples",
    "select_masks",
    "score_stats",
    "publish_mask",
    "load_mask_for_pool",
    "MaskFileError",
    "MASK_FILE",
]

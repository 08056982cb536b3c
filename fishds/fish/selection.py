"""Selection rules and the flow that fixes a FISH mask, independent of any training loop.

RULES is the table of selection rules (`fish.selection`): how a rule scores the pool and how it allocates k.
Adding a rule is one entry here; config.FishSection (the `fish:` section of `fishds train` and of the Hugging
Face callback) takes its choices and their documentation from this table.

The flow, called on every rank by both clients (fishds/run/train.py and fishds/integrations/hf.py):
    scoring_examples -> select_masks (score -> exact distributed top-k -> masks on every rank)
    -> (after a dense warm-up: enforce.reset_unselected) -> publish_mask (full masks, report, files on rank 0)
or, instead of scoring, load_mask_for_pool (a mask file of an earlier run).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dist as fdist
from ..files import MASK_FILE, SCORES_FILE, SELECTION_REPORT, write_json
from .adapter import gather_adapter, key_map, mask_report, save_initial_adapter, save_mask_file
from .mask import PackedMasks, share_selection
from .pool import Pool
from .select import exact_topk, float_keys, key_to_float, random_keys


@dataclass(frozen=True)
class Rule:
    """One selection rule. `keys(scores, start, end, seed)` gives this rank's int keys for its pool chunk
    [start, end) (scores: the Fisher scores of the chunk when `uses_scores`, else None); the k largest keys
    over all ranks are selected. `score_at(key)` turns the threshold key back into a score for the report."""
    doc: str  # one line for the config reference
    uses_scores: bool = False  # runs the Fisher pass (needs fish.num_samples >= ranks)
    keys: Optional[Callable[[Optional[torch.Tensor], int, int, int], torch.Tensor]] = None
    score_at: Optional[Callable[[int], float]] = None
    dense: bool = False  # no mask: k = the whole pool, nothing is enforced (plain PEFT)


RULES: dict[str, Rule] = {
    "fisher": Rule("top-k empirical Fisher (the paper)", uses_scores=True,
                   keys=lambda scores, start, end, seed: float_keys(scores), score_at=key_to_float),
    "random": Rule("k entries at random (ablation)",
                   keys=lambda scores, start, end, seed: random_keys(start, end, seed)),
    "lowest": Rule("the k lowest Fisher scores (ablation)", uses_scores=True,
                   keys=lambda scores, start, end, seed: -float_keys(scores) - 1,
                   score_at=lambda key: key_to_float(-key - 1)),
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
    return [examples[i] for i in order[:fish.num_samples]]


def progress_bar(total: int, desc: str):
    """A tqdm bar on rank 0 when stderr is a terminal; otherwise disabled (progress lines are printed instead)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (fdist.is_main() and sys.stderr.isatty()), dynamic_ncols=True)


def select_masks(fish, engine, pool: Pool, k: int, examples, collate, micro_batch_size: int,
                 scores_dir: Path | None = None) -> tuple[dict, dict]:
    """Scores -> exact global top-k -> full boolean masks on every rank, with report entries.

    fish: the `fish:` section (config.FishSection); examples: the scoring examples (see scoring_examples);
    scores_dir: where fish.save_scores writes the gathered scores."""
    r = rule(fish.selection)
    info = {"selection": fish.selection, "pool_size": pool.size, "k": k}
    start, end = pool.chunk(fdist.rank(), fdist.world_size())
    if r.dense:
        return {t.name: torch.ones(t.shape, dtype=torch.bool) for t in pool.tensors}, info
    scores = None
    if r.uses_scores:
        scores = _fisher_scores(fish, engine, pool, examples, collate, micro_batch_size, info, scores_dir)
    else:
        info["collect_seconds"] = 0.0
    keys = r.keys(scores, start, end, fish.seed)
    t0 = time.perf_counter()
    local_sel, threshold = exact_topk(keys, k)
    masks = share_selection(pool, local_sel)
    info["select_seconds"] = time.perf_counter() - t0
    if r.score_at is not None:
        info["threshold_score"] = r.score_at(threshold)
    return masks, info


def _fisher_scores(fish, engine, pool: Pool, examples, collate, micro_batch_size: int, info: dict,
                   scores_dir: Path | None) -> torch.Tensor:
    """This rank's chunk of the Fisher scores; timing and score statistics go into `info`."""
    from .fisher import collect_scores, gather_scores

    fisher_bar = progress_bar(0, f"Fisher pass ({fish.granularity})")

    def advance(done: int, total: int):
        fisher_bar.total = total
        fisher_bar.update(1)
    scores, stats = collect_scores(engine, pool, examples, fish.granularity, micro_batch_size, collate,
                                   progress=advance, per_example=fish.per_example)
    fisher_bar.close()
    info.update(stats, num_samples=len(examples), granularity=fish.granularity)
    info["score_stats"] = score_stats(scores)
    if getattr(fish, "save_scores", False) and scores_dir is not None:
        full = gather_scores(pool, scores)
        if full is not None:
            from safetensors.torch import save_file
            save_file({n: v.contiguous() for n, v in full.items()}, str(Path(scores_dir) / SCORES_FILE))
    return scores


def score_stats(local: torch.Tensor) -> dict:
    """Sum, mean, max, count of zeros and a log10 histogram of the scores, reduced over ranks (no gather)."""
    s = torch.tensor([float(local.sum()), float(local.numel()), float((local == 0).sum())], dtype=torch.float64)
    fdist.all_reduce_(s)
    mx = torch.tensor([float(local.max()) if local.numel() else 0.0])
    fdist.all_reduce_(mx, op=torch.distributed.ReduceOp.MAX)
    edges = list(range(-20, 6))  # log10 bin edges; bin i holds scores in [10^edges[i], 10^edges[i+1])
    pos = local[local > 0].double().log10().clamp(edges[0], edges[-1] - 1e-9)
    hist = torch.histc(pos, bins=len(edges) - 1, min=edges[0], max=edges[-1]).to(torch.float64)
    fdist.all_reduce_(hist)
    return {"sum": float(s[0]), "mean": float(s[0] / s[1]), "max": float(mx[0]), "zeros": int(s[2]),
            "log10_histogram": {"edges": edges, "counts": [int(c) for c in hist]}}


def publish_mask(model, trainable: Pool, masks: dict, report: dict, out: Path, save_initial: bool,
                 write: bool = True) -> PackedMasks:
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
        raise MaskFileError(f"fish.mask_path={path!r}: keys do not match the adapter (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); was it made with the same model, peft.r and target_modules?")
    masks = {}
    for t in pool.tensors:
        m = by_key[key_of[t.name]]
        if tuple(m.shape) != t.shape:
            raise MaskFileError(f"fish.mask_path={path!r}: {key_of[t.name]} has shape {list(m.shape)}, the "
                                f"adapter tensor has {list(t.shape)}")
        masks[t.name] = m
    return masks


__all__ = ["RULES", "Rule", "rule", "allocate_k", "scoring_examples", "select_masks", "score_stats", "publish_mask",
           "load_mask_for_pool", "MaskFileError", "MASK_FILE"]

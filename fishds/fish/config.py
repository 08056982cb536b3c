"""The `fish:` section of a fishds config, beside the method it configures: FishSection (used by `fishds train`,
fishds/config.Config.fish, and by the Hugging Face callback, fishds/integrations/hf.py) and the checks of a rule
against the rest of a run (check_run, called by fishds/run/preflight.py before any weights load).

Choices, their documentation and the cross-checks come from the entries of the tables: scores (fishds/fish/scores.py
SCORES), allocations (fishds/fish/allocation.py ALLOCATIONS), controls (fishds/fish/rules.py CONTROLS) and the
`fish.selection` shorthands (fishds/fish/selection.py RULES). Each entry carries its doc and what it needs (values
from training, Adam state, score values, lora_A / lora_B tensors, a classification head); adding one is one entry
there, and this section picks it up.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Optional

from pydantic import Field, model_validator

from ..methods import METHODS
from ..schema import ConfigError, Section
from .allocation import ALLOCATIONS
from .rules import CONTROLS
from .scores import SCORES
from .selection import RULES

CHOICES = {
    "selection": tuple(RULES),
    "score": tuple(SCORES),
    "allocation": tuple(ALLOCATIONS),
    "control": tuple(CONTROLS),
}
DEFAULT_DENSE_STEPS = 20  # fish.dense_steps when unset (runs of 100+ steps); see FishSection.dense_steps_for


def _choices(table: dict) -> str:
    return "; ".join(f"{name} ({entry.doc})" for name, entry in table.items())


def _names(table: dict, test) -> str:
    return ", ".join(name for name, entry in table.items() if test(entry))


class FishSection(Section):
    selection: Literal[CHOICES["selection"]] = Field(
        "fisher",
        description="; ".join(f"{name}: {r.doc}" for name, r in RULES.items()) + ". Shorthand for "
        f"fish.score ({_names(RULES, lambda r: not r.dense)}); dense trains every entry.",
    )
    score: Optional[Literal[CHOICES["score"]]] = Field(
        None,
        description="What ranks the pool entries (default: fish.selection): "
        + _choices(SCORES)
        + f". {_names(SCORES, lambda s: s.needs_warmup)} are read after the dense steps: they need "
        "fish.dense_steps > 0 and no scoring pass; "
        f"{_names(SCORES, lambda s: s.needs_adam)} needs AdamW's state (train.optimizer=adamw).",
    )
    allocation: Literal[CHOICES["allocation"]] = Field(
        "global",
        description="How k is shared out before the top-k: " + _choices(ALLOCATIONS) + ".",
    )
    control: Literal[CHOICES["control"]] = Field(
        "none",
        description="Control arms: "
        + _choices(CONTROLS)
        + f". {_names(CONTROLS, lambda c: c.needs_lora_ab)} needs a PEFT method with lora_A / lora_B tensors; "
        f"{_names(CONTROLS, lambda c: c.needs_classification)} needs data.format=classification.",
    )
    min_density: float = Field(
        0.25,
        ge=0,
        le=1,
        description="allocation=module: every module keeps at least this "
        "fraction of the uniform density k / pool size.",
    )
    reset_unselected: bool = Field(
        True,
        description="After dense steps (fish.dense_steps > 0): reset the "
        "unselected entries to their initial values (true) or keep their warmed-up "
        "values (false); either way they stay fixed afterwards.",
    )
    keep_ratio: Optional[float] = Field(
        None,
        description="Fraction of the pool to train, in (0, 1]: "
        "k = floor(keep_ratio * pool size). 0.5 when num_selected is not given.",
    )
    num_selected: Optional[int] = Field(None, description="Absolute number k of entries to train (1..pool size).")
    num_samples: int = Field(64, gt=0, description="N: training examples used to estimate the Fisher information.")
    granularity: Literal["sample", "batch"] = Field(
        "sample",
        description="sample: sum of per-example squared gradients (the paper's definition); "
        "batch: cheaper per-micro-batch variant, squares of micro-batch mean gradients.",
    )
    per_example: Literal["batched", "loop"] = Field(
        "batched",
        description="How granularity=sample gets its per-example gradients. batched: one forward/backward "
        "per micro-batch of train.micro_batch_size examples, per-example gradients from module hooks (LoRA A/B, "
        "rslora/pissa/olora, bottleneck, IA3, linear heads; other tensors, e.g. DoRA's magnitude, VeRA, LoHa, LoKr, "
        "are scored one example at a time and named in the log); same scores as loop. loop: one forward/backward per "
        "example (the paper's procedure, slower: under ZeRO-3 every example gathers every layer).",
    )
    budget: Literal["keep_ratio", "match_rank"] = Field(
        "keep_ratio",
        description="keep_ratio: k from keep_ratio / num_selected; match_rank: k = the trainable count "
        "of the same method at rank fish.match_r (protocol 1: rank 2r masked to the count of rank r).",
    )
    match_r: Optional[int] = Field(
        None,
        gt=0,
        description="The plain-PEFT rank whose trainable count k must equal "
        "(fish.budget=match_rank); must be below peft.r.",
    )
    pool_include: list[str] = Field(
        default_factory=list,
        description="Regular expressions: only trainable tensors "
        "whose name matches one form the pool (empty = all trainable tensors).",
    )
    pool_exclude: list[str] = Field(
        default_factory=list,
        description="Regular expressions: trainable tensors left out "
        "of the pool; they train fully and count towards k (e.g. a task head).",
    )
    freeze: list[str] = Field(
        default_factory=list,
        description="Regular expressions: trainable adapter tensors whose name matches one are frozen before the "
        "engine is built (never trained, not in the pool, kept at their initialisation and saved with the adapter), "
        "e.g. [lora_A]: LoRA with fixed random directions (fish.allocation=row needs it; fish.allocation=rank "
        "with it keeps the chosen directions fixed). Applies to fish.selection=dense too (the plain-LoRA control with "
        "A frozen). Unlike fish.pool_exclude, whose tensors train fully.",
    )
    seed: int = Field(0, description="Seed of the random selection and of the Fisher sample draw.")
    mask_path: Optional[str] = Field(
        None,
        description="Use this fish_mask.safetensors (from an earlier run) instead "
        "of scoring; its keys and shapes must match the adapter. Training is then masked by the file "
        "(not with fish.selection=dense, which trains every entry, nor with fish.dense_steps > 0 or "
        "fish.head_steps > 0: refused).",
    )
    save_scores: bool = Field(
        False,
        description="Also write fisher_scores.safetensors (gathers all scores on "
        "rank 0: for inspection on small pools only).",
    )
    compact_optimizer: bool = Field(
        False,
        description="Keep AdamW moments only for the selected entries of each "
        "rank's partition (12 B per selected entry instead of 8 B per entry; fp32 masters "
        "and gradients stay dense, as DeepSpeed holds them). Same bits as the dense masked "
        "AdamW. "
        "Needs train.optimizer=adamw, no optimizer in the DeepSpeed JSON, no optimizer "
        "offload, a mask (not selection=dense).",
    )
    regrow_every: int = Field(
        0,
        ge=0,
        description="Mask regrowth (RigL-style, inside the adapter), 0 = off (the mask stays fixed). Every N masked "
        "steps (counted from the first masked step), while the step is at most fish.regrow_until x the run's steps, "
        "each pool tensor drops the d = round(fish.regrow_fraction x its selected count) selected entries that moved "
        "least since they were grown (|theta - theta when grown|; the initial mask counts as grown when it was fixed) "
        "and grows the d unselected entries with the largest |sum g| over the interval (the unmasked local gradients "
        "of its steps, summed over ranks): exact distributed top-k per tensor, ties to the lowest global index, the "
        "same mask on any number of ranks; per-tensor counts stay exact. Grown entries start from their current "
        "(frozen) value, dropped ones stay frozen at theirs; the optimizer moments of both are zeroed. Costs a "
        "pool-sized fp32 gradient sum and a chunk-sized fp32 copy of the values per rank. Not with "
        "fish.compact_optimizer, fish.selection=dense, train.save_best, nor a resume on another number of ranks.",
    )
    regrow_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="fish.regrow_every > 0: the share of each tensor's selected entries dropped and regrown at "
        "every regrowth, in (0, 1) (rounded half up per tensor, at most the tensor's unselected count).",
    )
    regrow_until: float = Field(
        0.75,
        gt=0,
        le=1,
        description="fish.regrow_every > 0: regrowth happens only at steps <= this fraction of the run's steps "
        "(train.max_steps / epochs, dense steps included); the mask stays fixed afterwards.",
    )
    regrow_random: bool = Field(
        False,
        description="fish.regrow_every > 0, a control: the same drops, but the grown entries are drawn at random "
        "(a fish.seed hash of the global index and the step, the same for any number of ranks) instead of by "
        "|sum g|.",
    )
    dense_steps: Optional[int] = Field(
        None,
        ge=0,
        description="Dense optimizer steps (every pool entry trains) before the mask is scored and fixed (after "
        "fish.head_steps, if any); they count in the run's steps (train.max_steps / train.epochs). Unset (default): "
        "for a score read from training (all but random) min(20, a fifth of the run's steps after fish.head_steps), "
        "at least 1 on runs of 2 such steps or more, so the "
        "scores are read after training has started (at LoRA's initialisation every lora_A gradient is 0); 0 for "
        "random masks and the random_b_only / head_only controls. 0: score at initialisation (the paper's rule). "
        "Unselected entries are then reset to their initial values (fish.reset_unselected). Formerly "
        "fish.warmup_steps (still read, with a deprecation warning).",
    )
    head_steps: int = Field(
        0,
        ge=0,
        description="Classification (data.format=classification) only: optimizer steps that train ONLY the "
        "freshly initialised classification head, before anything else (before fish.dense_steps and before "
        "scoring), so that the scores are not read through a random head. Every pool entry and every other "
        "trainable tensor stays bit for bit at its initial value meanwhile (weight decay included). They count in "
        "the run's steps like the dense steps (train.max_steps / train.epochs): steps 1..head_steps train the head "
        "(phase head in metrics.jsonl), then the dense steps, then masked training; the LR schedule spans all of "
        "them. The default fish.dense_steps is computed from the steps after them. Refused with a mask file "
        "(fish.mask_path fixes the mask before the first step) and by FishCallback (the Trainer owns its loop). "
        "0 (default): no head steps.",
    )

    @property
    def dense(self) -> bool:
        """No mask: every entry trains (fish.selection=dense)."""
        return RULES[self.selection].dense

    def reads_training(self) -> bool:
        """Whether the rule's scores are read from training (a dense warm-up then helps)."""
        return (
            not self.dense
            and not self.mask_path
            and not SCORES[self.score].is_random
            and CONTROLS[self.control].runs_rule
            and not ALLOCATIONS[self.allocation].scores_at_init
        )

    def dense_steps_for(self, steps: int) -> int:
        """The dense steps of a run of `steps` optimizer steps (fish.head_steps included): fish.dense_steps when set,
        else the default rule on the steps after the head steps, n = steps - fish.head_steps (min(DEFAULT_DENSE_STEPS,
        n // 5), at least 1 when n >= 2) for a rule that reads the training state, and 0 for one that does not (no
        mask, a mask file, random scores, the random_b_only / head_only controls)."""
        if self.dense_steps is not None:
            return self.dense_steps
        steps -= self.head_steps  # the steps that train the adapter
        return min(DEFAULT_DENSE_STEPS, max(1, steps // 5)) if self.reads_training() and steps >= 2 else 0

    def resolved(self, steps: int) -> "FishSection":
        """This section with fish.dense_steps resolved for a run of `steps` optimizer steps (dense_steps_for)."""
        return self.model_copy(update={"dense_steps": self.dense_steps_for(steps)})

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        """fish.warmup_steps (the old name of fish.dense_steps: it clashed with the LR warm-up train.lr_warmup_*);
        fish.score from fish.selection; keep_ratio 0.5 when no budget is given."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "warmup_steps" in data:
            if "dense_steps" in data:
                raise ValueError(
                    "fish.warmup_steps is the deprecated name of fish.dense_steps; set only fish.dense_steps"
                )
            warnings.warn(
                "fish.warmup_steps is deprecated: it is now fish.dense_steps (dense steps before the "
                "Fisher scoring, not an LR warm-up); rename the key",
                FutureWarning,
                stacklevel=2,
            )
            data["dense_steps"] = data.pop("warmup_steps")
        selection = data.get("selection", "fisher")
        dense = selection in RULES and RULES[selection].dense
        if data.get("score") is None and not dense and selection in RULES:
            data["score"] = selection
        no_budget = data.get("keep_ratio") is None and data.get("num_selected") is None
        if not dense and no_budget and data.get("budget", "keep_ratio") == "keep_ratio":
            data["keep_ratio"] = 0.5
        return data

    @model_validator(mode="after")
    def _budget(self):
        self._rule()
        self._regrow()
        if self.dense:
            return self
        if self.keep_ratio is not None and self.num_selected is not None:
            raise ValueError(
                "fish: set only one of fish.keep_ratio (a fraction in (0, 1]) or fish.num_selected "
                "(an absolute count), not both"
            )
        if self.budget == "match_rank":
            if self.match_r is None or self.keep_ratio is not None or self.num_selected is not None:
                raise ValueError("fish.budget=match_rank needs fish.match_r and no fish.keep_ratio / fish.num_selected")
            return self
        if self.keep_ratio is not None and not (0.0 < self.keep_ratio <= 1.0 and math.isfinite(self.keep_ratio)):
            raise ValueError(
                f"fish.keep_ratio={self.keep_ratio} is outside (0, 1]; use e.g. 0.1 to train 10% of the pool"
            )
        if self.num_selected is not None and self.num_selected < 1:
            raise ValueError(f"fish.num_selected={self.num_selected} must be at least 1")
        return self

    def _regrow(self) -> None:
        """fish.regrow_every needs a mask whose per-entry state it can move: no dense run, no compact optimizer."""
        if not self.regrow_every:
            return
        if self.dense:
            raise ValueError(
                f"fish.regrow_every={self.regrow_every} regrows a mask; fish.selection=dense has none "
                "(set fish.regrow_every=0 or choose a selection)"
            )
        if self.compact_optimizer:
            raise ValueError(
                f"fish.regrow_every={self.regrow_every} and fish.compact_optimizer=true cannot be combined: the "
                "compact optimizer keeps moments for a fixed set of entries; set one of them off"
            )
        if ALLOCATIONS[self.allocation].select is not None:
            raise ValueError(
                f"fish.regrow_every={self.regrow_every} drops and grows single entries per tensor, which would break "
                f"the structure of fish.allocation={self.allocation} (whole components, quotas per row); set "
                "fish.regrow_every=0 or use a quota allocation (global, tensor, module, ab_balanced)"
            )

    def _rule(self) -> None:
        """Contradictions and rules that cannot run, refused (from what the entries say they need)."""
        if "selection" in self.model_fields_set and self.score is not None and self.selection != self.score:
            raise ValueError(
                f"fish.selection={self.selection} and fish.score={self.score} contradict; "
                "fish.selection is a shorthand for fish.score (dense: no mask): set only fish.score"
            )
        if self.mask_path and self.head_steps:
            raise ValueError(
                f"fish.mask_path={self.mask_path!r} fixes the mask before the first step; fish.head_steps="
                f"{self.head_steps} (head-only steps before the mask is fixed) does not apply to a mask file: remove it"
            )
        if self.dense:
            if self.mask_path:
                raise ValueError(
                    f"fish.selection=dense trains every entry but fish.mask_path={self.mask_path!r} fixes a mask; "
                    "drop fish.mask_path, or drop fish.selection=dense to train the file's entries"
                )
            return
        if self.mask_path and self.dense_steps:
            raise ValueError(
                f"fish.mask_path={self.mask_path!r} fixes the mask before the first step; fish.dense_steps="
                f"{self.dense_steps} (dense steps before scoring) does not apply to a mask file: remove it"
            )
        score, allocation, control = SCORES[self.score], ALLOCATIONS[self.allocation], CONTROLS[self.control]
        if score.needs_warmup and self.dense_steps == 0 and control.runs_rule:  # unset: the default dense steps
            raise ValueError(
                f"fish.score={self.score} is read after the dense steps; set fish.dense_steps > 0 (e.g. 20)"
            )
        if score.is_random and allocation.needs_values:
            raise ValueError(
                f"fish.allocation={self.allocation} {allocation.needs_values}, which fish.score={self.score} "
                "does not have; use fish.allocation=tensor, or fish.control=random_matched with the rule "
                f"whose {self.allocation} quotas you want"
            )
        if allocation.name == "rank" and self.dense_steps and not self.reset_unselected:
            raise ValueError(
                "fish.allocation=rank slices the unselected components away from the saved adapter: they must be "
                "back at their initialisation (lora_B column 0) after the dense steps; drop "
                "fish.reset_unselected=false"
            )
        if score.is_random and control.needs_scored_rule:
            raise ValueError(
                f"fish.control={self.control} {control.needs_scored_rule}; set fish.score "
                "to that rule (e.g. saliency) instead of random"
            )


def _outside_pool(kind: str, f) -> bool:
    """Whether a LoRA tensor of this kind (e.g. lora_A) is frozen or kept out of the pool by the section's patterns."""
    import re

    name = f"base_model.model.model.layers.0.self_attn.q_proj.{kind}.default.weight"
    matches = lambda pats: any(re.search(p, name) for p in pats)  # noqa: E731
    return matches(f.freeze) or matches(f.pool_exclude) or bool(f.pool_include and not matches(f.pool_include))


def check_run(cfg, ds: dict) -> None:
    """The rule against the rest of the run (cfg: config.Config; ds: the resolved DeepSpeed JSON), before any
    weights load: what the score and the control need of the PEFT method, the data and the optimizer."""
    f = cfg.fish
    if f.head_steps and cfg.data.format != "classification":
        raise ConfigError(
            f"fish.head_steps={f.head_steps} trains only a classification head before the rest; data.format="
            f"{cfg.data.format} has none: set data.format=classification or remove fish.head_steps"
        )
    if f.dense:
        return
    control, score, allocation = CONTROLS[f.control], SCORES[f.score], ALLOCATIONS[f.allocation]
    if allocation.methods is not None and control.runs_rule and cfg.peft.method not in allocation.methods:
        raise ConfigError(
            f"fish.allocation={f.allocation} supports peft.method {', '.join(allocation.methods)}; got "
            f"peft.method={cfg.peft.method}"
            + (
                " (its lora_B is not 0 at initialisation, so unselected components would not be inert)"
                if f.allocation == "rank" and METHODS[cfg.peft.method].lora_ab
                else ""
            )
        )
    if f.allocation == "row" and control.runs_rule and not _outside_pool("lora_A", f):
        raise ConfigError(
            "fish.allocation=row gives each lora_B row a quota with lora_A fixed: add fish.freeze: [lora_A]"
        )
    if f.allocation in ("rank", "row") and f.budget == "keep_ratio" and f.keep_ratio is not None:
        whole = f.keep_ratio * cfg.peft.r
        if abs(whole - round(whole)) > 1e-9 or round(whole) < 1:
            raise ConfigError(
                f"fish.allocation={f.allocation} keeps whole {'components' if f.allocation == 'rank' else 'counts'}: "
                f"fish.keep_ratio={f.keep_ratio} x peft.r={cfg.peft.r} = {whole:g} must be a whole number >= 1 "
                f"(or use fish.budget=match_rank)"
            )
    if control.needs_lora_ab and not METHODS[cfg.peft.method].lora_ab:
        raise ConfigError(
            f"fish.control={f.control} needs lora_B tensors; peft.method={cfg.peft.method} has none "
            f"(use one of {', '.join(n for n, m in METHODS.items() if m.lora_ab)})"
        )
    if control.needs_classification and cfg.data.format != "classification":
        raise ConfigError(
            f"fish.control={f.control} trains only a classification head; it needs data.format=classification"
        )
    if score.needs_adam and control.runs_rule:
        named = ds.get("optimizer", {}).get("type", "")
        if (named and "adam" not in named.lower()) or (not named and cfg.train.optimizer != "adamw"):
            raise ConfigError(
                f"fish.score={f.score} reads AdamW's second moment; train.optimizer={cfg.train.optimizer}"
                + (f" (DeepSpeed optimizer {named})" if named else "")
                + " has none: use adamw"
            )

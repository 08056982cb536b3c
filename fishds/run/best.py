"""The best checkpoint by an evaluation metric, and early stopping (train.save_best, train.metric_for_best,
train.early_stopping_patience).

- Direction from the name: a metric ending in `loss` (or `ppl`) is better lower; one ending in `accuracy` or
  `acc` is better higher; any other name is refused in preflight, naming train.metric_for_best.
- Every evaluation (train.eval_every, and the last one) counts for early stopping: training stops after
  `early_stopping_patience` evaluations in a row without improvement.
- The best checkpoint is the one whose step's evaluation was best; checkpoints are written after the
  evaluation of the same step, so train.save_every must be a multiple of train.eval_every. It is never
  pruned by train.keep_checkpoints, and with save_best the final output_dir holds its adapter (the last
  step's adapter goes to output_dir/last/ when it differs).
The state (best value and step, evaluations without improvement) travels in each checkpoint's
fishds_state.json, so a resumed run continues it.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from ..config import Config, ConfigError
from ..files import ADAPTER_FILES, LAST_DIR


def metric_name(cfg: Config) -> str:
    name = cfg.train.metric_for_best
    return name if name.startswith(("eval_", "test_")) else f"eval_{name}"


def higher_is_better(name: str) -> bool:
    if name.endswith(("loss", "ppl")):
        return False
    if name.endswith(("accuracy", "acc")):
        return True
    raise ConfigError(
        f"train.metric_for_best={name!r}: direction unknown; use a name ending in loss (lower is "
        "better) or accuracy / acc (higher is better), e.g. eval_loss, eval_accuracy, eval_token_acc"
    )


def check(cfg: Config, has_eval: bool, classification: bool) -> None:
    """Preflight: the metric exists for this data format, evaluations happen, checkpoints land on them."""
    t = cfg.train
    if not (t.save_best or t.early_stopping_patience):
        return
    key = "train.save_best" if t.save_best else "train.early_stopping_patience"
    name = metric_name(cfg)
    higher_is_better(name)
    known = ("eval_loss", "eval_accuracy") if classification else ("eval_loss", "eval_ppl", "eval_token_acc")
    if name not in known:
        raise ConfigError(
            f"train.metric_for_best={t.metric_for_best!r}: evaluation of data.format="
            f"{cfg.data.format!r} reports {', '.join(known)}; choose one of them"
        )
    if not has_eval:
        raise ConfigError(f"{key} needs evaluation data: set data.eval_path or data.eval_split")
    if not t.eval_every:
        raise ConfigError(f"{key} needs train.eval_every > 0 (evaluations to compare)")
    if t.save_best and (not t.save_every or t.save_every % t.eval_every):
        raise ConfigError(
            f"train.save_best needs train.save_every (now {t.save_every}) to be a positive multiple of "
            f"train.eval_every (now {t.eval_every}): each checkpoint is judged by its step's evaluation"
        )


class BestTracker:
    """Best value of the metric, its step, the best checkpoint, and evaluations since the last improvement."""

    def __init__(self, cfg: Config, state: dict | None = None):
        t = cfg.train
        self.enabled = bool(t.save_best or t.early_stopping_patience)
        self.name = metric_name(cfg) if self.enabled else None
        self.higher = higher_is_better(self.name) if self.enabled else False
        self.patience = t.early_stopping_patience
        s = state or {}
        self.value, self.step = s.get("value"), s.get("step")
        self.ckpt_value, self.ckpt_step = s.get("ckpt_value"), s.get("ckpt_step")
        self.bad_evals = s.get("bad_evals", 0)
        self.last = s.get("last")  # (step, value) of the latest evaluation

    def _better(self, a: float, b: float | None) -> bool:
        if b is None:
            return not math.isnan(a)
        return a > b if self.higher else a < b

    def update(self, step: int, metrics: dict) -> bool:
        """Record one evaluation; True when it improved on the best so far."""
        if not self.enabled or self.name not in metrics:
            return False
        v = float(metrics[self.name])
        self.last = [step, v]
        if self._better(v, self.value):
            self.value, self.step, self.bad_evals = v, step, 0
            return True
        self.bad_evals += 1
        return False

    def on_checkpoint(self, step: int) -> None:
        """A checkpoint of `step` was written: it becomes the best checkpoint if its evaluation is the best."""
        if self.enabled and self.last and self.last[0] == step and self._better(self.last[1], self.ckpt_value):
            self.ckpt_value, self.ckpt_step = self.last[1], step

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def state(self) -> dict:
        return {
            "metric": self.name,
            "value": self.value,
            "step": self.step,
            "ckpt_value": self.ckpt_value,
            "ckpt_step": self.ckpt_step,
            "bad_evals": self.bad_evals,
            "last": self.last,
        }


def install_best_adapter(out: Path, best_folder: Path) -> None:
    """Rank 0: move the last step's adapter files to out/last/, copy the best checkpoint's adapter into out."""
    last = out / LAST_DIR
    last.mkdir(exist_ok=True)
    for name in ADAPTER_FILES:
        if (out / name).is_file():
            os.replace(out / name, last / name)
    for name in ADAPTER_FILES:
        if (best_folder / name).is_file():
            tmp = out / f".{name}.best.tmp"
            shutil.copyfile(best_folder / name, tmp)
            os.replace(tmp, out / name)


def summarise(tracker: BestTracker, report: dict, last_step: int, total_steps: int) -> bool:
    """Add the best-checkpoint entry to the report; True when output_dir must get the best checkpoint's adapter
    (a checkpoint evaluated at least as well as the last step: of equal evaluations the earliest counts)."""
    final = tracker.last[1] if tracker.last and tracker.last[0] == last_step else None
    use_ckpt = (
        tracker.ckpt_step is not None
        and tracker.ckpt_step != last_step
        and (final is None or not tracker._better(final, tracker.ckpt_value))
    )  # a tie: the earlier one
    step, value = (tracker.ckpt_step, tracker.ckpt_value) if use_ckpt else (last_step, final)
    report["best"] = {
        "metric": tracker.name,
        "step": step,
        "value": value,
        "last_step": last_step,
        "last_value": final,
        "stopped_early": last_step < total_steps,
        "output_dir_adapter": f"checkpoint step {step}" if use_ckpt else "last step",
    }
    return use_ckpt

"""Every check of a `fishds train` run that can fail without weights or data rows, in one pass: the DeepSpeed JSON
(resolved once, here), the data paths and splits (found, not read: the first rank checks every row while it
tokenises, fishds/run/data.py, still before weights load), data.num_proc, the output folder and resume point, the
model and its target modules, the budget's plain-PEFT baselines. Raises ConfigError naming the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import quant
from ..assets import TASKS
from ..config import Config, ConfigError, resolve_precision
from ..dsconfig import resolve_ds_config
from ..files import CHECKPOINT_STATE, REPORT_FILE
from ..fish import rules
from ..fish.compact import check_config as check_compact
from ..fish.config import check_run as check_rule
from ..fish.regrow import check_config as check_regrow
from ..fish.selection import rule
from ..model import check_model_and_targets, count_trainable, is_classification, resolve_model_path
from . import best, reshard, schedule, trackers
from .checkpoint import find_resume
from .mixing import sources
from .splits import check_num_proc, check_path


@dataclass(kw_only=True)
class Plan:
    """What preflight resolved: paths and checked inputs."""

    model_path: str
    data_path: str
    eval_path: str | None
    ds_path: str | None
    output_dir: Path
    resume_from: Path | None = None
    baselines: dict = field(default_factory=dict)  # plain-PEFT rank -> trainable count
    test_path: str | None = None
    labels: list | None = None  # classification: the classes, in class-id order (set by train.load_data)
    ds: dict = field(default_factory=dict)  # the resolved DeepSpeed config
    data_counts: dict = field(default_factory=dict)  # per data key: rows, truncated, dropped (load_examples)
    sources: list = field(default_factory=list)  # the training sources (mixing.Source): data.path or data.datasets


def preflight(cfg: Config, ds_path: str | None) -> Plan:
    """All checks that need no weights; raises ConfigError naming the key."""
    ds_path = ds_path or cfg.ds_config
    resolve_precision(cfg)  # train.precision=auto -> bf16 / fp32 (load_config did it already for YAML configs)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / the deepspeed launcher before ranks start
    model_path = resolve_model_path(cfg.model)  # the model's config.json sizes the hidden-size "auto" buckets
    ds = resolve_ds_config(cfg, ds_path, world, model_path)  # fp16, ZeRO stage, "auto"s, contradictions: up front
    check_compact(cfg, ds)
    check_regrow(cfg)
    trackers.check(cfg)
    schedule.check(cfg)
    quant.check(cfg, ds["zero_optimization"].get("stage", 0))
    check_rule(cfg, ds)
    if rules.needs_pass(cfg.fish) and cfg.fish.num_samples < world:
        raise ConfigError(
            f"fish.num_samples={cfg.fish.num_samples} is smaller than the {world} ranks; "
            "every rank needs at least one scoring example"
        )
    d = cfg.data
    data_path, eval_path = d.path, d.eval_path
    if data_path in TASKS:
        files = TASKS[data_path]("classification" if is_classification(cfg.data) else "alpaca")
        data_path, eval_path = str(files["train"]), eval_path or (None if d.eval_split else str(files["validation"]))
    srcs = sources(d, data_path)  # data.path or data.datasets
    test_path = d.test_path
    check_num_proc(d)
    for src in srcs:
        check_num_proc(src.data)
        check_path(src.path, src.key, src.data)
    for key, path in (("data.eval_path", eval_path), ("data.test_path", test_path)):
        if path:
            check_path(path, key, d)
    if cfg.fish.mask_path and not Path(cfg.fish.mask_path).is_file():
        raise ConfigError(f"fish.mask_path={cfg.fish.mask_path!r}: file not found")
    out = Path(cfg.output_dir)
    if (out / REPORT_FILE).exists() and not cfg.overwrite:
        raise ConfigError(
            f"output_dir={cfg.output_dir!r} already holds a finished run ({REPORT_FILE}); choose "
            "another output_dir or set overwrite=true"
        )
    try:
        resume_from = None if cfg.overwrite and cfg.resume == "auto" else find_resume(cfg.resume, out)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if resume_from is not None:
        reshard.check(
            json.loads((resume_from / CHECKPOINT_STATE).read_text()),
            resume_from,
            world,
            cfg.fish.compact_optimizer,
            cfg.train.micro_batch_size,
            cfg.train.resume_trust_pickle,
            regrow=bool(cfg.fish.regrow_every),
        )
    best.check(cfg, bool(eval_path or d.eval_split), is_classification(cfg.data))
    check_model_and_targets(cfg.model, cfg.peft, cfg.data, model_path)  # classification: the head once labels are read
    return Plan(
        model_path=model_path,
        data_path=srcs[0].path,
        eval_path=eval_path,
        ds_path=ds_path,
        output_dir=out,
        resume_from=resume_from,
        baselines=baseline_counts(cfg, model_path),
        test_path=test_path,
        labels=None,
        ds=ds,
        sources=srcs,
    )


def baseline_counts(cfg: Config, model_path: str, num_labels: int | None = None) -> dict[int, int]:
    """Trainable counts of plain PEFT at the ranks the budget compares with (meta device, no weights)."""
    f, r = cfg.fish, cfg.peft.r
    if rule(f.selection).dense:
        return {}
    if f.budget == "match_rank":  # match_r < peft.r: checked by config.Config
        return {f.match_r: count_trainable(cfg.model, cfg.peft, cfg.data, model_path, f.match_r, num_labels, f.freeze)}
    if f.keep_ratio is not None and (r * f.keep_ratio).is_integer() and 0 < r * f.keep_ratio < r:
        return {
            int(r * f.keep_ratio): count_trainable(
                cfg.model, cfg.peft, cfg.data, model_path, int(r * f.keep_ratio), num_labels, f.freeze
            )
        }
    return {}

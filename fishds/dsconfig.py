"""DeepSpeed JSON: read it, fill "auto" values from the fishds config, and refuse contradictions.

Filled keys: train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size,
gradient_clipping, bf16.enabled, and optimizer.params lr / weight_decay when the JSON names an
optimizer. A value given explicitly must agree with the fishds config (one source of truth).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

DEFAULT = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 100000000}


def read_ds_config(path: str | None) -> dict:
    if path is None:
        return json.loads(json.dumps(DEFAULT))
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--ds_config {path}: file not found (see ds_configs/ for zero0..zero3)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {path}: must hold a JSON object")
    return cfg


def _fill(tree: dict, key: str, value: Any, source: str, fishds_key: str) -> None:
    current = tree.get(key, "auto")
    if current == "auto":
        tree[key] = value
    elif current != value:
        raise ConfigError(f"{source}: {key}={current!r} contradicts {fishds_key} (which gives {value!r}); set it to "
                          f"\"auto\" or change {fishds_key}")


def resolve_ds_config(cfg: Config, path: str | None, world_size: int) -> dict:
    """The DeepSpeed config dict for deepspeed.initialize, with every "auto" resolved."""
    ds = read_ds_config(path)
    src = path or "built-in DeepSpeed config"
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, src, "train.grad_accum")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.grad_accum * world_size, src,
          "train.micro_batch_size x train.grad_accum x world size")
    _fill(ds, "gradient_clipping", t.grad_clip, src, "train.grad_clip")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", t.precision == "bf16", src, "train.precision")
    for half in ("fp16",):
        if ds.get(half, {}).get("enabled") is True:
            raise ConfigError(f"{src}: fp16 is not supported by fishds; remove the fp16 section or set "
                              "train.precision=bf16")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage={zero.get('stage')!r} must be 0, 1, 2 or 3")
    nvme = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device") == "nvme"]
    if nvme:
        raise ConfigError(f"{src}: zero_optimization.{nvme[0]}.device=nvme is not supported with FISH masks; "
                          "use cpu or none")
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", t.lr, src + " optimizer.params", "train.lr")
        _fill(params, "weight_decay", t.weight_decay, src + " optimizer.params", "train.weight_decay")
        if opt.get("type", "").lower() in ("adam", "adamw"):
            from deepspeed.accelerator import get_accelerator
            if get_accelerator().device_name() == "cpu":
                params.setdefault("torch_adam", True)  # FusedAdam would compile for a minute on CPU
    if "scheduler" in ds:
        raise ConfigError(f"{src}: remove the scheduler section; fishds sets the schedule from train.scheduler and "
                          "train.lr_warmup_steps")
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds

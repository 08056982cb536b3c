"""DeepSpeed JSON: read it, fill "auto" values from the fishds config and the model, and refuse contradictions.

A stock JSON (the Hugging Face / Axolotl / LLaMA-Factory ds_z2 / ds_z3 files) works unchanged: every "auto" the
Hugging Face integration fills (transformers.integrations.deepspeed, HfTrainerDeepSpeedConfig) is filled here:
- train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size, gradient_clipping: train.*
- bf16.enabled = (train.precision == bf16); fp16.enabled = false (fp16 is refused when set true)
- zero_optimization.reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = int(0.9 hidden^2),
  stage3_param_persistence_threshold = 10 hidden (hidden_size from the model's config.json)
- optimizer.params lr / weight_decay (train.lr, train.weight_decay), betas [0.9, 0.999], eps 1e-8 (the client
  AdamW's values); a JSON optimizer replaces the client optimizer. With offload_optimizer.device=cpu and no
  optimizer in the JSON, fishds names AdamW there so that DeepSpeed runs its CPU Adam (train.optimizer=adamw)
- scheduler: WarmupLR, WarmupDecayLR and WarmupCosineLR are honoured (DeepSpeed builds them) when their type
  matches train.scheduler (constant, linear, cosine); params warmup_min_lr = 0, warmup_max_lr / cos_min_ratio
  from train.lr, warmup_num_steps = max(1, train.lr_warmup_steps) (DeepSpeed refuses 0),
  total_num_steps = train.max_steps (fish.head_steps and fish.dense_steps are part of it). Other types are refused,
  naming scheduler.type.
A value given explicitly must agree with the fishds config (one source of truth); an "auto" left anywhere else
is refused before any weights load, naming its key. zero_optimization.round_robin_gradients (LLaMA-Factory's
ds_z2 sets it) is turned off at ZeRO 1/2: DeepSpeed 0.19.8 then maps fp32 masters to the wrong parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

DEFAULT = {"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True, "steps_per_print": 100000000}
# DeepSpeed scheduler type -> the train.scheduler it matches
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


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
        raise ConfigError(
            f"{source}: {key}={current!r} contradicts {fishds_key} (which gives {value!r}); set it to "
            f'"auto" or change {fishds_key}'
        )


def _fill_only(tree: dict, key: str, value: Any) -> None:
    """An "auto" (or absent) value becomes `value`; an explicit one is the user's choice."""
    if tree.get(key, "auto") == "auto":
        tree[key] = value


def hidden_size(model_path: str | None, keys: list[str], src: str) -> int:
    """hidden_size from the model's config.json (as the Hugging Face integration reads it)."""
    p = Path(model_path or "") / "config.json"
    conf = json.loads(p.read_text()) if model_path and p.is_file() else None
    if conf is None:
        raise ConfigError(
            f'{src}: {", ".join(keys)} are "auto" but model.name_or_path has no readable '
            "config.json to take hidden_size from; give numbers for them"
        )
    for c in (conf, conf.get("text_config") or {}):
        if isinstance(c.get("hidden_size"), int):
            return c["hidden_size"]
        if c.get("hidden_sizes"):
            return max(c["hidden_sizes"])
    raise ConfigError(
        f'{src}: {", ".join(keys)} are "auto" but {p} has neither hidden_size nor hidden_sizes; give numbers for them'
    )


def _left_auto(tree, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _left_auto(v, f"{prefix}{key}.")]
    return [prefix[:-1]] if tree == "auto" else []


def total_steps(cfg: Config) -> int | None:
    """Optimizer steps of the whole run (fish.head_steps and fish.dense_steps included), or None when train.epochs
    sets the length (known only once the data is read)."""
    from .run.schedule import DEFAULT_STEPS

    t = cfg.train
    return t.max_steps if t.max_steps is not None else None if t.epochs is not None else DEFAULT_STEPS


def resolve_ds_config(cfg: Config, path: str | None, world_size: int, model_path: str | None = None) -> dict:
    """The DeepSpeed config dict for deepspeed.initialize, with every "auto" resolved (or a ConfigError)."""
    ds = read_ds_config(path)
    src = path or "built-in DeepSpeed config"
    t = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, src, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.grad_accum, src, "train.grad_accum")
    _fill(
        ds,
        "train_batch_size",
        t.micro_batch_size * t.grad_accum * world_size,
        src,
        "train.micro_batch_size x train.grad_accum x world size",
    )
    _fill(ds, "gradient_clipping", t.grad_clip, src, "train.grad_clip")
    bf16 = ds.setdefault("bf16", {})
    _fill(bf16, "enabled", t.precision == "bf16", src, "train.precision")
    for half in ("fp16",):
        if ds.get(half, {}).get("enabled") is True:
            raise ConfigError(
                f"{src}: fp16 is not supported by fishds; remove the fp16 section or set train.precision=bf16"
            )
        if half in ds:
            _fill_only(ds[half], "enabled", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{src}: zero_optimization.stage={zero.get('stage')!r} must be 0, 1, 2 or 3")
    nvme = [k for k in ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device") == "nvme"]
    if nvme:
        raise ConfigError(
            f"{src}: zero_optimization.{nvme[0]}.device=nvme is not supported with FISH masks; use cpu or none"
        )
    if zero.get("round_robin_gradients") and zero.get("stage") in (1, 2):
        # DeepSpeed 0.19.8 links fp32 masters to the parameters in their original order while the flat buffer
        # holds them round-robin (measured: masters and weights disagree, safe_get_full_fp32_param too); the
        # option only reorders gradient partitions for CPU offload speed, so fishds turns it off.
        zero["round_robin_gradients"] = False
    by_hidden = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    auto = [k for k in by_hidden if zero.get(k) == "auto"]
    if auto:
        h = hidden_size(model_path or cfg.model.name_or_path, [f"zero_optimization.{k}" for k in auto], src)
        for k in auto:
            zero[k] = by_hidden[k](h)
    if (zero.get("offload_optimizer") or {}).get("device") == "cpu" and "optimizer" not in ds:
        if t.optimizer != "adamw":
            raise ConfigError(
                f"{src}: zero_optimization.offload_optimizer.device=cpu runs DeepSpeedCPUAdam; "
                f"train.optimizer={t.optimizer!r} cannot be offloaded: set train.optimizer=adamw or "
                "remove offload_optimizer"
            )
        ds["optimizer"] = {"type": "AdamW", "params": {}}  # DeepSpeed's CPU Adam (what ZeRO-Offload expects)
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        _fill(params, "lr", t.lr, src + " optimizer.params", "train.lr")
        _fill(params, "weight_decay", t.weight_decay, src + " optimizer.params", "train.weight_decay")
        _fill_only(params, "betas", [0.9, 0.999])
        _fill_only(params, "eps", 1e-8)
        if opt.get("type", "").lower() in ("adam", "adamw"):
            from deepspeed.accelerator import get_accelerator

            offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu",)
            if get_accelerator().device_name() == "cpu" and not offload:
                params.setdefault("torch_adam", True)  # FusedAdam would compile for a minute on CPU
    if "scheduler" in ds:
        _scheduler(ds["scheduler"], cfg, src)
    left = _left_auto(ds)
    if left:
        raise ConfigError(
            f'{src}: {left[0]} is "auto" but fishds does not fill it (it fills the keys the Hugging '
            "Face integration fills); give a value" + (f" (also: {', '.join(left[1:])})" if left[1:] else "")
        )
    ds.setdefault("zero_allow_untested_optimizer", True)
    return ds


def _scheduler(sched: dict, cfg: Config, src: str) -> None:
    t = cfg.train
    kind = sched.get("type")
    if kind not in SCHEDULERS:
        raise ConfigError(
            f"{src}: scheduler.type={kind!r} is not supported; use WarmupLR, WarmupDecayLR or "
            "WarmupCosineLR, or remove the scheduler section (fishds then follows train.scheduler)"
        )
    if SCHEDULERS[kind] != t.scheduler:
        raise ConfigError(
            f"{src}: scheduler.type={kind!r} contradicts train.scheduler={t.scheduler!r}; set "
            f"train.scheduler={SCHEDULERS[kind]} or remove the scheduler section"
        )
    if t.head_lr is not None and kind != "WarmupCosineLR":
        raise ConfigError(
            f"{src}: scheduler.type={kind!r} sets one absolute rate for every parameter group, so "
            f"train.head_lr={t.head_lr} would be ignored; remove the scheduler section (fishds then follows "
            "train.scheduler) or train.head_lr"
        )
    params = sched.setdefault("params", {})
    warm = max(1, t.lr_warmup_steps)  # DeepSpeed >= 0.19.6 refuses 0 warm-up steps (the HF integration does this)
    if kind == "WarmupCosineLR":
        _fill_only(params, "warmup_min_ratio", 0.0)
        _fill_only(params, "cos_min_ratio", 0.0)
    else:
        _fill_only(params, "warmup_min_lr", 0.0)
        _fill(params, "warmup_max_lr", t.lr, src + " scheduler.params", "train.lr")
        _fill_only(params, "warmup_type", "linear")
    _fill(params, "warmup_num_steps", warm, src + " scheduler.params", "max(1, train.lr_warmup_steps)")
    if kind != "WarmupLR":
        total = total_steps(cfg)
        if total is None and params.get("total_num_steps", "auto") == "auto":
            raise ConfigError(
                f"{src}: scheduler.params.total_num_steps='auto' needs train.max_steps (with "
                "train.epochs the run's length is known only once the data is read); set train.max_steps, "
                "or a number in the JSON, or remove the scheduler section"
            )
        if total is not None:
            _fill(params, "total_num_steps", total, src + " scheduler.params", "train.max_steps")

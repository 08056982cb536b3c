"""Loading the base model and tokenizer and adding the PEFT adapter.

`check_model_and_targets` runs before any weights load: it reads config.json, builds the model on
the meta device and checks that peft.target_modules matches at least one module.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, ConfigError

_LINEAR_SKIP = ("lm_head", "score", "classifier")


def resolve_model_path(cfg: Config) -> str:
    name = cfg.model.name_or_path
    if name == "smollm2-135m-instruct":
        from .assets import smollm2_135m_instruct
        return str(smollm2_135m_instruct())
    return name


def check_model_and_targets(cfg: Config, model_path: str) -> list[str]:
    """Validate model.name_or_path and peft.target_modules without loading weights; return matched modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(model_path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.name_or_path={model_path!r} is not a model folder (no config.json); give a local "
                          "folder saved with save_pretrained, or 'smollm2-135m-instruct'")
    try:
        hf_cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - report any loader failure as a config error
        raise ConfigError(f"model.name_or_path={model_path!r}: config.json cannot be read ({e})") from None
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=cfg.model.trust_remote_code)
    names = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    if cfg.peft.method == "bottleneck":
        from .bottleneck import PLACEMENT
        matched = [n for n in names if n.split(".")[-1] in PLACEMENT[cfg.peft.placement]]
        if not matched:
            raise ConfigError(f"peft.placement={cfg.peft.placement!r}: {model_path} has no {PLACEMENT[cfg.peft.placement]} "
                              "projection to put bottleneck adapters after")
        return matched
    targets = cfg.peft.target_modules
    if targets == "all-linear":
        matched = [n for n in names if n.split(".")[-1] not in _LINEAR_SKIP]
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        matched = [n for n in names if n.split(".")[-1] in wanted]
        missing = [w for w in wanted if not any(n.split(".")[-1] == w for n in names)]
        if missing:
            present = sorted({n.split(".")[-1] for n in names})
            raise ConfigError(f"peft.target_modules: {missing} match no linear module of {model_path}; "
                              f"available: {present}")
    if not matched:
        raise ConfigError(f"peft.target_modules={targets!r} matches no module of {model_path}")
    return matched


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Methods whose adapter creation reads the base weights (DoRA's norms, PiSSA's and OLoRA's decompositions,
# the weight shapes LoHa, LoKr and VeRA take from the tensor): under ZeRO-3 these load the base model whole
# on every rank and partition it at deepspeed.initialize, instead of loading it straight into partitions.
NEEDS_BASE_WEIGHTS_AT_INIT = ("dora", "pissa", "olora", "loha", "lokr", "vera")


def peft_config(cfg: Config, r: int | None = None, for_counting: bool = False):
    """The peft config object for peft.method (r overrides peft.r, e.g. to count a baseline's parameters)."""
    from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig

    p = cfg.peft
    r = r or p.r
    if p.method == "bottleneck":
        return None
    common = {"target_modules": p.target_modules, "task_type": "CAUSAL_LM",
              "modules_to_save": list(p.modules_to_save) or None}
    if p.method in ("lora", "dora", "rslora", "pissa", "olora"):
        init = {"pissa": "pissa", "olora": "olora"}.get(p.method, True)
        return LoraConfig(r=r, lora_alpha=p.alpha, lora_dropout=p.dropout, use_dora=p.method == "dora",
                          use_rslora=p.method == "rslora", init_lora_weights=True if for_counting else init, **common)
    if p.method == "ia3":
        return IA3Config(feedforward_modules=[], **common)
    if p.method == "loha":
        return LoHaConfig(r=r, alpha=p.alpha, module_dropout=p.dropout, **common)
    if p.method == "lokr":
        return LoKrConfig(r=r, alpha=p.alpha, module_dropout=p.dropout, **common)
    if p.method == "vera":
        return VeraConfig(r=r, vera_dropout=p.dropout, **common)
    raise ConfigError(f"peft.method={p.method!r} is not supported")


def count_trainable(cfg: Config, model_path: str, r: int) -> int:
    """Trainable parameters of plain peft.method at rank r, counted on the meta device (no weights read)."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.peft.method == "bottleneck":
            from .bottleneck import add_bottlenecks
            model = add_bottlenecks(base, r, cfg.peft.placement)
        else:
            model = get_peft_model(base, peft_config(cfg, r=r, for_counting=True))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_peft_model(cfg: Config, model_path: str, dtype: torch.dtype):
    """The base model with the PEFT adapter; only adapter parameters require gradients."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from . import quant

    torch.manual_seed(cfg.train.seed)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code,
                                                **quant.load_kwargs(cfg))
    quant.after_load(base)
    base.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if cfg.peft.method == "bottleneck":
        from .bottleneck import add_bottlenecks
        return add_bottlenecks(base, cfg.peft.r, cfg.peft.placement, dtype)
    return get_peft_model(base, peft_config(cfg))

"""Loading the base model and tokenizer and adding the PEFT adapter.

`check_model_and_targets` runs before any weights load: it reads config.json, builds the model on
the meta device and checks that peft.target_modules matches at least one module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, ConfigError
from .methods import METHODS, PeftMethod
from .run.formats import FORMATS

_LINEAR_SKIP = ("lm_head", "score", "classifier")


def resolve_model_path(cfg: Config) -> str:
    name = cfg.model.name_or_path
    if name == "smollm2-135m-instruct":
        from .assets import smollm2_135m_instruct

        return str(smollm2_135m_instruct())
    if name == "all-minilm-l6-v2":
        from .assets import all_minilm_l6_v2

        return str(all_minilm_l6_v2())
    from .hub import resolve_model

    return resolve_model(name)  # a local folder, or the Hub snapshot of org/name


def is_classification(cfg: Config) -> bool:
    return FORMATS[cfg.data.format].classification


def auto_class(cfg: Config):
    """AutoModelForSequenceClassification for data.format=classification, else AutoModelForCausalLM."""
    import transformers

    return (
        transformers.AutoModelForSequenceClassification if is_classification(cfg) else transformers.AutoModelForCausalLM
    )


def hf_config(cfg: Config, model_path: str, num_labels: int | None = None):
    from transformers import AutoConfig

    kwargs = {"num_labels": num_labels} if num_labels else {}
    return AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code, **kwargs)


def head_patterns(cfg: Config) -> list[str]:
    """Pool-exclude patterns for the classification head: trained in full, counted in the budget (as in FISH Mask)."""
    return [r"\.modules_to_save\."] if is_classification(cfg) else []


def check_model_and_targets(cfg: Config, model_path: str, num_labels: int | None = None) -> list[str]:
    """Validate model.name_or_path and peft.target_modules without loading weights; return matched modules."""
    p = Path(model_path)
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={model_path!r} is not a model folder (no config.json); give a local "
            "folder saved with save_pretrained, or 'smollm2-135m-instruct'"
        )
    try:
        hf_cfg = hf_config(cfg, model_path, num_labels)
    except Exception as e:  # noqa: BLE001 - report any loader failure as a config error
        raise ConfigError(f"model.name_or_path={model_path!r}: config.json cannot be read ({e})") from None
    try:
        with torch.device("meta"):
            meta = auto_class(cfg).from_config(hf_cfg, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as e:
        task = "sequence classification" if is_classification(cfg) else "causal language modelling"
        raise ConfigError(
            f"model.name_or_path={model_path!r}: a {hf_cfg.model_type} model has no {task} head in "
            f"transformers (data.format={cfg.data.format!r}); {e}"
        ) from None
    names = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    if peft_method(cfg).build is None:  # bottleneck adapters go after fixed projections
        from .bottleneck import PLACEMENT

        matched = [n for n in names if n.split(".")[-1] in PLACEMENT[cfg.peft.placement]]
        if not matched:
            raise ConfigError(
                f"peft.placement={cfg.peft.placement!r}: {model_path} has no "
                f"{PLACEMENT[cfg.peft.placement]} projection to put bottleneck adapters after"
            )
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
            raise ConfigError(
                f"peft.target_modules: {missing} match no linear module of {model_path}; available: {present}"
            )
    if not matched:
        raise ConfigError(f"peft.target_modules={targets!r} matches no module of {model_path}")
    return matched


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def peft_method(cfg: Config) -> PeftMethod:
    """The table entry of peft.method (fishds/methods.py)."""
    return METHODS[cfg.peft.method]


def peft_config(cfg: Config, r: int | None = None, for_counting: bool = False):
    """The peft config object for peft.method (r overrides peft.r, e.g. to count a baseline's parameters);
    None for a method fishds builds itself (bottleneck)."""
    p = cfg.peft
    build = peft_method(cfg).build
    if build is None:
        return None
    common = {
        "target_modules": p.target_modules,
        "task_type": "SEQ_CLS" if is_classification(cfg) else "CAUSAL_LM",
        "modules_to_save": list(p.modules_to_save) or None,
    }
    return build(p, r or p.r, common, for_counting)


def count_trainable(cfg: Config, model_path: str, r: int, num_labels: int | None = None) -> int:
    """Trainable parameters of plain peft.method at rank r, counted on the meta device (no weights read)."""
    from peft import get_peft_model

    hf_cfg = hf_config(cfg, model_path, num_labels)
    with torch.device("meta"):
        base = auto_class(cfg).from_config(hf_cfg, trust_remote_code=cfg.model.trust_remote_code)
        if peft_method(cfg).build is None:
            from .bottleneck import add_bottlenecks

            model = add_bottlenecks(base, r, cfg.peft.placement)
        else:
            model = get_peft_model(base, peft_config(cfg, r=r, for_counting=True))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_peft_model(
    cfg: Config, model_path: str, dtype: torch.dtype, labels: list | None = None, pad_token_id: int | None = None
):
    """The base model with the PEFT adapter; only adapter parameters (and a classification head) require gradients."""
    from peft import get_peft_model

    from . import quant

    torch.manual_seed(cfg.train.seed)
    kwargs = quant.load_kwargs(cfg)
    if labels:
        kwargs.update(
            num_labels=len(labels),
            id2label={i: str(v) for i, v in enumerate(labels)},
            label2id={str(v): i for i, v in enumerate(labels)},
        )
    base = auto_class(cfg).from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, **kwargs
    )
    quant.after_load(base)
    if base.config.pad_token_id is None and pad_token_id is not None:
        base.config.pad_token_id = pad_token_id  # a decoder's classification head reads the last non-pad token
    base.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if peft_method(cfg).build is None:
        from .bottleneck import add_bottlenecks

        return add_bottlenecks(base, cfg.peft.r, cfg.peft.placement, dtype)
    from .hub import given_name

    model = get_peft_model(base, peft_config(cfg))
    for adapter_cfg in model.peft_config.values():  # saved as adapter_config.json's base_model_name_or_path
        adapter_cfg.base_model_name_or_path = given_name(cfg.model.name_or_path, model_path)
    return model

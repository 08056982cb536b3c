"""Loading the base model and tokenizer and adding the PEFT adapter.

`check_model_and_targets` runs before any weights load: it reads config.json, builds the model on
the meta device and checks that peft.target_modules matches at least one module.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import quant
from .bottleneck import PLACEMENT, add_bottlenecks
from .config import Config, ConfigError, DataSection, ModelSection, PeftSection
from .hub import given_name
from .methods import METHODS, PeftMethod
from .run.formats import FORMATS

_LINEAR_SKIP = ("lm_head", "score", "classifier")


def resolve_model_path(model: ModelSection) -> str:
    """model.name_or_path as a local folder (the embedded models, a folder, or the Hub snapshot of org/name)."""
    name = model.name_or_path
    if name == "smollm2-135m-instruct":
        from .assets import smollm2_135m_instruct

        return str(smollm2_135m_instruct())
    if name == "all-minilm-l6-v2":
        from .assets import all_minilm_l6_v2

        return str(all_minilm_l6_v2())
    from .hub import resolve_model

    return resolve_model(name)  # a local folder, or the Hub snapshot of org/name


def is_classification(data: DataSection) -> bool:
    return FORMATS[data.format].classification


def auto_class(data: DataSection):
    """AutoModelForSequenceClassification for data.format=classification, else AutoModelForCausalLM."""
    import transformers

    return (
        transformers.AutoModelForSequenceClassification
        if is_classification(data)
        else transformers.AutoModelForCausalLM
    )


def hf_config(model: ModelSection, model_path: str, num_labels: int | None = None):
    from transformers import AutoConfig

    kwargs = {"num_labels": num_labels} if num_labels else {}
    return AutoConfig.from_pretrained(model_path, trust_remote_code=model.trust_remote_code, **kwargs)


def head_patterns(data: DataSection) -> list[str]:
    """Pool-exclude patterns for the classification head: trained in full, counted in the budget (as in FISH Mask)."""
    return [r"\.modules_to_save\."] if is_classification(data) else []


def check_model_and_targets(
    model: ModelSection, peft: PeftSection, data: DataSection, model_path: str, num_labels: int | None = None
) -> list[str]:
    """Validate model.name_or_path and peft.target_modules without loading weights; return matched modules."""
    p = Path(model_path)
    if not (p / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={model_path!r} is not a model folder (no config.json); give a local "
            "folder saved with save_pretrained, or 'smollm2-135m-instruct'"
        )
    try:
        hf_cfg = hf_config(model, model_path, num_labels)
    except Exception as e:  # noqa: BLE001 - report any loader failure as a config error
        raise ConfigError(f"model.name_or_path={model_path!r}: config.json cannot be read ({e})") from None
    try:
        with torch.device("meta"):
            meta = auto_class(data).from_config(hf_cfg, trust_remote_code=model.trust_remote_code)
    except ValueError as e:
        task = "sequence classification" if is_classification(data) else "causal language modelling"
        raise ConfigError(
            f"model.name_or_path={model_path!r}: a {hf_cfg.model_type} model has no {task} head in "
            f"transformers (data.format={data.format!r}); {e}"
        ) from None
    names = [n for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)]
    if peft_method(peft).own_adapter:  # bottleneck adapters go after fixed projections
        matched = [n for n in names if n.split(".")[-1] in PLACEMENT[peft.placement]]
        if not matched:
            raise ConfigError(
                f"peft.placement={peft.placement!r}: {model_path} has no "
                f"{PLACEMENT[peft.placement]} projection to put bottleneck adapters after"
            )
        return matched
    targets = peft.target_modules
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


ATTN_PACKAGES = {"flash_attention_2": "flash-attn", "flash_attention_3": "flash-attn 3 (flash_attn_interface)"}


def check_backends(cfg: Config, zero_stage: int) -> None:
    """model.attn_implementation and train.loss_impl can run here (installed, CUDA): a one-line ConfigError naming
    the field otherwise, before any weights load."""
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

    from .run.loss import check_loss_impl

    attn = cfg.model.attn_implementation
    if attn in ATTN_PACKAGES:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"model.attn_implementation={attn} runs on a CUDA GPU and there is none here; use sdpa (the default)"
            )
        available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available}
        if not available[attn]():
            raise ConfigError(
                f"model.attn_implementation={attn} needs {ATTN_PACKAGES[attn]}, which is not installed (or does not "
                "support this GPU); install it or use model.attn_implementation=sdpa"
            )
    if not is_classification(cfg.data):
        impl = cfg.train.loss_impl
        targets = cfg.peft.target_modules
        adapted = "lm_head" in cfg.peft.modules_to_save or (
            targets != "all-linear" and "lm_head" in ([targets] if isinstance(targets, str) else targets)
        )
        if impl in ("liger", "cce") and adapted:
            raise ConfigError(
                f"train.loss_impl={impl} takes the output embedding's weight, but lm_head is adapted (in "
                "peft.target_modules or peft.modules_to_save); use train.loss_impl=chunked"
            )
        check_loss_impl(impl, zero_stage)


def load_tokenizer(model_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def peft_method(peft: PeftSection) -> PeftMethod:
    """The table entry of peft.method (fishds/methods.py)."""
    return METHODS[peft.method]


def peft_config(peft: PeftSection, data: DataSection, r: int | None = None, for_counting: bool = False):
    """The peft config object for peft.method (r overrides peft.r, e.g. to count a baseline's parameters);
    None for a method fishds builds itself (bottleneck)."""
    if peft_method(peft).own_adapter:
        return None
    common = {
        "target_modules": peft.target_modules,
        "task_type": "SEQ_CLS" if is_classification(data) else "CAUSAL_LM",
        "modules_to_save": list(peft.modules_to_save) or None,
    }
    return peft_method(peft).build(peft, r or peft.r, common, for_counting)


def count_trainable(
    model: ModelSection,
    peft: PeftSection,
    data: DataSection,
    model_path: str,
    r: int,
    num_labels: int | None = None,
    freeze=(),
) -> int:
    """Trainable parameters of plain peft.method at rank r, counted on the meta device (no weights read), less the
    tensors `freeze` (fish.freeze's regular expressions) matches."""
    import re

    from peft import get_peft_model

    hf_cfg = hf_config(model, model_path, num_labels)
    with torch.device("meta"):
        base = auto_class(data).from_config(hf_cfg, trust_remote_code=model.trust_remote_code)
        if peft_method(peft).own_adapter:
            counted = add_bottlenecks(base, r, peft.placement)
        else:
            counted = get_peft_model(base, peft_config(peft, data, r=r, for_counting=True))
    return sum(
        p.numel() for n, p in counted.named_parameters() if p.requires_grad and not any(re.search(x, n) for x in freeze)
    )


def load_base(cfg: Config, model_path: str, dtype: torch.dtype, labels: list | None = None, pad_token_id=None):
    """The base model as a run loads it (model.*, quant.* and train.precision; a classification head sized by
    `labels`), for training (load_peft_model) and for `fishds evaluate`."""
    kwargs = quant.load_kwargs(cfg)  # quant.*, train.precision
    if labels:
        kwargs.update(
            num_labels=len(labels),
            id2label={i: str(v) for i, v in enumerate(labels)},
            label2id={str(v): i for i, v in enumerate(labels)},
        )
    base = auto_class(cfg.data).from_pretrained(
        model_path,
        dtype=dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        **kwargs,
    )
    quant.after_load(base)
    if base.config.pad_token_id is None and pad_token_id is not None:
        base.config.pad_token_id = pad_token_id  # a decoder's classification head reads the last non-pad token
    return base


def load_peft_model(
    cfg: Config, model_path: str, dtype: torch.dtype, labels: list | None = None, pad_token_id: int | None = None
):
    """The base model with the PEFT adapter; only adapter parameters (and a classification head) require gradients.
    Takes the whole config: it reads model, peft, quant, train (seed, gradient checkpointing) and data."""
    from peft import get_peft_model

    torch.manual_seed(cfg.train.seed)
    base = load_base(cfg, model_path, dtype, labels, pad_token_id)
    base.config.use_cache = False
    if cfg.train.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if peft_method(cfg.peft).own_adapter:
        return add_bottlenecks(base, cfg.peft.r, cfg.peft.placement, dtype)
    model = get_peft_model(base, peft_config(cfg.peft, cfg.data))
    for adapter_cfg in model.peft_config.values():  # saved as adapter_config.json's base_model_name_or_path
        adapter_cfg.base_model_name_or_path = given_name(cfg.model.name_or_path, model_path)
    return model

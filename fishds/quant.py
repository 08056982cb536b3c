"""QLoRA: the frozen backbone in 4 bits (bitsandbytes Linear4bit), and the checks that run before weights load.

What works was measured here (bitsandbytes 0.50.2, peft 0.21, DeepSpeed 0.19.8, CPU, 2 ranks):
- lora, rslora, dora, ia3 and vera train over Linear4bit layers (dora not under ZeRO-3, where DeepSpeed meets
  a 4-bit weight it did not partition: refused); pissa, loha and lokr fail in their
  forward on a 4-bit weight, olora rewrites the base weight into a residual (re-quantized), and fishds'
  bottleneck adapters were not tried on 4 bits: all refused in preflight.
- transformers 5.x never loads a quantized model through zero.Init (modeling_utils skips it when a
  quantizer is set): every rank quantizes the whole backbone at load, and deepspeed.initialize then
  partitions it. Measured: the 4-bit weights end up 1/world per rank with uint8, fp32 (fp32 training)
  and bf16 storage; storage does not need to equal the compute dtype on this path.
- bf16 training with fp32 storage fails (DeepSpeed casts every floating parameter to bf16, which halves
  the packed 4-bit buffer: "shape '[32, 16]' is invalid for input of size 256"): refused in preflight.
- no device_map and no prepare_model_for_kbit_training (DeepSpeed places the model; the upcast of norms
  to fp32 that prepare_model_for_kbit_training does would mix dtypes inside a bf16 engine).
- bitsandbytes repacks a Linear4bit weight in place for a faster CPU kernel at its first eval-mode
  forward on AVX512-BF16 CPUs; that changes the tensor DeepSpeed holds and fails for layers narrower than
  the 64-entry block, so fishds switches it off (`after_load`).
"""

from __future__ import annotations

import torch

from .config import Config, ConfigError, resolve_precision
from .methods import METHODS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "uint8": torch.uint8}
QUANT_METHODS = tuple(name for name, m in METHODS.items() if m.quant_4bit)  # fishds/methods.py


def enabled(cfg: Config) -> bool:
    return cfg.quant.bits == 4


def compute_dtype(cfg: Config) -> str:
    return cfg.quant.compute_dtype or resolve_precision(cfg)  # follows train.precision (auto resolved)


def storage_dtype(cfg: Config) -> str:
    return cfg.quant.storage_dtype or compute_dtype(cfg)


def check(cfg: Config, zero_stage: int) -> None:
    """Refuse, before any weights load, a quant.* combination that cannot work; names the field to change."""
    if not enabled(cfg):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "quant.bits=4 needs the bitsandbytes package (pip install bitsandbytes); or set quant.bits=null"
        ) from None
    if cfg.peft.method not in QUANT_METHODS:
        raise ConfigError(
            f"quant.bits=4 does not work with peft.method={cfg.peft.method!r} (its adapter cannot wrap "
            f"or rewrites a 4-bit weight); use one of {', '.join(QUANT_METHODS)} or set quant.bits=null"
        )
    problem = METHODS[cfg.peft.method].quant_4bit_zero3_problem
    if problem and zero_stage == 3:
        raise ConfigError(
            f"quant.bits=4 with peft.method={cfg.peft.method!r} fails under ZeRO-3 ({problem}); use "
            "ZeRO-2 (ds_configs/zero2.json), peft.method=lora, or quant.bits=null"
        )
    storage = storage_dtype(cfg)
    if storage == "fp32" and cfg.train.precision == "bf16":
        raise ConfigError(
            f"quant.storage_dtype={storage} (null follows quant.compute_dtype) with "
            "train.precision=bf16: DeepSpeed casts every floating "
            "parameter to bf16, which would corrupt the packed 4-bit values; set quant.storage_dtype "
            "to bf16 or uint8"
        )


def bnb_config(cfg: Config):
    """The transformers BitsAndBytesConfig for quant.*, or None without quantization."""
    if not enabled(cfg):
        return None
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[compute_dtype(cfg)],
        bnb_4bit_quant_storage=DTYPES[storage_dtype(cfg)],
    )


def load_kwargs(cfg: Config) -> dict:
    """Extra from_pretrained arguments: the quantization config (no device_map: DeepSpeed places the model)."""
    q = bnb_config(cfg)
    return {} if q is None else {"quantization_config": q}


def after_load(model) -> None:
    """Keep every Linear4bit weight in its loaded layout (no in-place CPU repacking at eval time)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False

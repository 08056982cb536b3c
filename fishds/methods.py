"""The PEFT methods fishds trains, as one table: METHODS[name] says how to build the method's peft config and
what it supports. Adding a method is one entry here (config.PeftSection takes its choices from this table; the
README's config reference describes peft.method in config.py).

prefix: the name part under which the method's tensors live in the state dict (`...q_proj.lora_A.default.weight`:
lora_; fishds/fish/keys.py parses adapter keys with it). build(peft_section, r, common, for_counting) -> a peft
config; `common` holds target_modules, task_type and modules_to_save; for_counting: the config only counts
trainable parameters on the meta device (no data-dependent initialisation). build=None: fishds adds the adapter
itself (fishds/bottleneck.py). Capabilities: lora_ab (lora_A / lora_B factors), quant_4bit (a 4-bit backbone),
needs_base_weights_at_init (no zero.Init loading under ZeRO-3), trains_head, lora_shapes (`fishds plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True, kw_only=True)
class PeftMethod:
    prefix: str  # how the method's tensors (or its adapter module) are named in the state dict: fishds/fish/keys.py
    build: Optional[Callable] = None
    lora_ab: bool = False  # LoRA-style lora_A / lora_B factors (fish.control=random_b_only)
    # adapter creation reads the base weights (DoRA's norms, PiSSA's and OLoRA's decompositions, the weight shapes
    # LoHa, LoKr and VeRA take from the tensor): under ZeRO-3 these load the base model whole on every rank and
    # partition it at deepspeed.initialize, instead of loading it straight into partitions (zero.Init)
    needs_base_weights_at_init: bool = False
    quant_4bit: bool = False  # works on a 4-bit (bitsandbytes) backbone: quant.bits=4
    quant_4bit_zero3_problem: Optional[str] = None  # why quant.bits=4 fails under ZeRO-3 (None: it works)
    trains_head: bool = True  # can train a classification head (data.format=classification)
    lora_shapes: bool = False  # `fishds plan` can size it (LoRA-shaped A/B factors)

    @property
    def own_adapter(self) -> bool:
        """fishds adds the adapter itself (build=None: bottleneck hooks, fishds/bottleneck.py): saved under its
        parameter names, with its own config file, not through PEFT."""
        return self.build is None


def _lora(p, r, common, for_counting):
    from peft import LoraConfig

    init = {"pissa": "pissa", "olora": "olora"}.get(p.method, True)
    return LoraConfig(
        r=r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        use_dora=p.method == "dora",
        use_rslora=p.method == "rslora",
        init_lora_weights=True if for_counting else init,
        **common,
    )


def _ia3(p, r, common, for_counting):
    from peft import IA3Config

    return IA3Config(feedforward_modules=[], **common)


def _loha(p, r, common, for_counting):
    from peft import LoHaConfig

    return LoHaConfig(r=r, alpha=p.alpha, module_dropout=p.dropout, **common)


def _lokr(p, r, common, for_counting):
    from peft import LoKrConfig

    return LoKrConfig(r=r, alpha=p.alpha, module_dropout=p.dropout, **common)


def _vera(p, r, common, for_counting):
    from peft import VeraConfig

    return VeraConfig(r=r, vera_dropout=p.dropout, **common)


METHODS: dict[str, PeftMethod] = {
    "lora": PeftMethod(prefix="lora_", build=_lora, lora_ab=True, quant_4bit=True, lora_shapes=True),
    "dora": PeftMethod(
        prefix="lora_",
        build=_lora,
        lora_ab=True,
        needs_base_weights_at_init=True,
        quant_4bit=True,
        lora_shapes=True,
        quant_4bit_zero3_problem="DeepSpeed meets a 4-bit weight it did not partition: 'Params4bit' "
        "object has no attribute 'ds_status'",
    ),
    "rslora": PeftMethod(prefix="lora_", build=_lora, lora_ab=True, quant_4bit=True, lora_shapes=True),
    "pissa": PeftMethod(prefix="lora_", build=_lora, lora_ab=True, needs_base_weights_at_init=True),
    "olora": PeftMethod(prefix="lora_", build=_lora, lora_ab=True, needs_base_weights_at_init=True),
    "ia3": PeftMethod(prefix="ia3_", build=_ia3, quant_4bit=True),
    "loha": PeftMethod(prefix="hada_", build=_loha, needs_base_weights_at_init=True),
    "lokr": PeftMethod(prefix="lokr_", build=_lokr, needs_base_weights_at_init=True),
    "vera": PeftMethod(prefix="vera_", build=_vera, needs_base_weights_at_init=True, quant_4bit=True),
    # Houlsby / Pfeiffer adapters built by fishds (fishds/bottleneck.py): `<module>.bottleneck.{down,up}.*`
    "bottleneck": PeftMethod(prefix="bottleneck", trains_head=False),
}

"""Parsing adapter tensor names: layer, module type and tensor kind of an adapter / mask key (any PEFT method).

The one parser of adapter keys: the mask report of a run (adapter.mask_report: per module, lora_A / lora_B
shares) and the picture `fishds report` draws (report.py) both read keys through `parse_key`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..methods import METHODS

OTHER = "other"
KINDS = ("lora_A", "lora_B", OTHER)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# the prefixes of PEFT methods fishds reads adapters of (`fishds report`) but does not train (fishds/methods.py
# names the others), and the parts under which PEFT keeps fully trained modules
READ_ONLY_PREFIXES = ("oft_", "boft_", "hra_", "fourierft_", "vblora_", "bone_", "c3a_", "shira_", "miss_", "road_")
WRAPPERS = ("ln_tuning", "modules_to_save", "original_module")
# a part that names an adapter tensor (or the adapter module holding it): the module is the part before
_ADAPTER_PART = re.compile(
    "^(?:"
    + "|".join(re.escape(p) for p in dict.fromkeys([*(m.prefix for m in METHODS.values()), *READ_ONLY_PREFIXES]))
    + "|"
    + "|".join(WRAPPERS)
    + ")"
)
_TRAILING = {"weight", "bias", "default"}


@dataclass(frozen=True)
class KeyInfo:
    layer: int | str  # the layer index, or "other"
    module: str  # q_proj, ..., or the last meaningful name part
    kind: str  # lora_A, lora_B or other


def adapter_part(parts: list[str]) -> int | None:
    """The index of the first name part that names an adapter tensor or module, or None."""
    return next((i for i, p in enumerate(parts) if _ADAPTER_PART.match(p)), None)


def kind_of(key: str) -> str:
    """lora_A, lora_B, or other (what the reports' A/B shares count)."""
    return next((p for p in key.split(".") if p in ("lora_A", "lora_B")), OTHER)


def layer_of(key: str) -> str:
    """The transformer block index in a key (`layers.3.` -> "3"), or "other"."""
    return str(parse_key(key).layer)


def module_path(key: str) -> str:
    """The full name of the adapted module a tensor belongs to: the name up to its adapter part
    (`...q_proj.lora_A.default.weight` -> `...q_proj`); without one, the name less its last part (and less
    `weight` / `bias`: `...adapter.down.weight` -> `...adapter`)."""
    parts = key.split(".")
    idx = adapter_part(parts)
    if idx is not None and idx > 0:
        return ".".join(parts[:idx])
    return ".".join(parts[:-2] if len(parts) > 2 and parts[-1] in ("weight", "bias") else parts[:-1])


def parse_key(key: str) -> KeyInfo:
    """Layer, module type and tensor kind of an adapter / mask key (any PEFT method)."""
    m = _LAYER.search(key)
    layer: int | str = int(m.group(1)) if m else OTHER
    parts = key.split(".")
    kind = kind_of(key)
    idx = adapter_part(parts)
    if idx is not None and idx > 0:
        module = parts[idx - 1]
    else:
        kept = [p for p in parts if p not in _TRAILING and not p.isdigit()]
        module = kept[-1] if kept else key
    return KeyInfo(layer, module, kind)

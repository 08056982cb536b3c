"""Parsing adapter tensor names: layer, module type and tensor kind of an adapter / mask key (any PEFT method).

The one parser of adapter keys: the mask report of a run (adapter.mask_report: per module, lora_A / lora_B
shares) and the picture `fishds report` draws (report.py) both read keys through `parse_key`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OTHER = "other"
KINDS = ("lora_A", "lora_B", OTHER)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# a part that names an adapter tensor (or the adapter module holding it): the module type is the part before
_ADAPTER_PART = re.compile(
    r"^(?:lora_|ia3_|hada_|lokr_|vera_|oft_|boft_|hra_|fourierft_|vblora_|bone_|c3a_|"
    r"shira_|miss_|road_|ln_tuning|bottleneck$|modules_to_save$|original_module$)"
)
_TRAILING = {"weight", "bias", "default"}


@dataclass(frozen=True)
class KeyInfo:
    layer: int | str  # the layer index, or "other"
    module: str  # q_proj, ..., or the last meaningful name part
    kind: str  # lora_A, lora_B or other


def parse_key(key: str) -> KeyInfo:
    """Layer, module type and tensor kind of an adapter / mask key (any PEFT method)."""
    m = _LAYER.search(key)
    layer: int | str = int(m.group(1)) if m else OTHER
    parts = key.split(".")
    kind = next((p for p in parts if p in ("lora_A", "lora_B")), OTHER)
    idx = next((i for i, p in enumerate(parts) if _ADAPTER_PART.match(p)), None)
    if idx is not None and idx > 0:
        module = parts[idx - 1]
    else:
        kept = [p for p in parts if p not in _TRAILING and not p.isdigit()]
        module = kept[-1] if kept else key
    return KeyInfo(layer, module, kind)

"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), which peft does not offer.

An adapter is h -> h + up(act(down(h))) on a sublayer's output, `up` initialised to zero (so, like
LoRA's B, the adapter starts as the identity and `down` has zero gradient at initialisation).
Placement "houlsby": after the attention output projection and after the MLP output projection of
every layer; "pfeiffer": after the MLP output projection only. The adapter wraps those projections, so
nothing else in the model changes. Files: bottleneck_config.json + bottleneck_adapter.safetensors,
loaded onto a fresh base model by `load_bottleneck`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
PLACEMENT = {"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)}


class Bottleneck(torch.nn.Module):
    def __init__(self, dim: int, r: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, r)
        self.up = torch.nn.Linear(r, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


class WithBottleneck(torch.nn.Module):
    """A projection followed by its bottleneck adapter."""

    def __init__(self, base: torch.nn.Module, r: int):
        super().__init__()
        self.base_layer = base
        self.bottleneck = Bottleneck(base.out_features, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(self.base_layer(x))


def add_bottlenecks(model: torch.nn.Module, r: int, placement: str, dtype=None) -> torch.nn.Module:
    """Freeze the model and wrap its placement projections with trainable bottleneck adapters."""
    if placement not in PLACEMENT:
        raise ValueError(f"bottleneck placement {placement!r} must be one of {sorted(PLACEMENT)}")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if n.split(".")[-1] in PLACEMENT[placement] and isinstance(m, torch.nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no module named {PLACEMENT[placement]} to place bottleneck adapters after")
    for name, module in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        wrapped = WithBottleneck(module, r)
        if dtype is not None:
            wrapped.bottleneck.to(dtype)
        setattr(parent, name.rsplit(".", 1)[1], wrapped)
    model.bottleneck_config = {"r": r, "placement": placement}
    return model


def save_bottleneck(model: torch.nn.Module, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write the config and the (gathered) adapter tensors, keyed by parameter name."""
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps(model.bottleneck_config) + "\n")


def load_bottleneck(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """Add the saved bottleneck adapters to a base model and load their weights (safetensors only)."""
    d = Path(adapter_dir)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    add_bottlenecks(model, cfg["r"], cfg["placement"])
    state = load_file(str(d / WEIGHTS_NAME))
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{d / WEIGHTS_NAME}: keys {sorted(missing)[:3]} do not exist in this model")
    model.load_state_dict(state, strict=False)
    return model

"""The adapter as the FISH method sees it: gathered full tensors, the keys PEFT writes them under, and the
files keyed like the adapter (the mask file, the initial adapter), plus the mask's per-module report.

Used by both clients of the method core (`fishds train` and the Hugging Face callback).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import INIT_ADAPTER_FILE, MASK_FILE, atomic
from .keys import OTHER, parse_key
from .mask import PackedMasks, save_masks
from .pool import Pool


@torch.no_grad()
def gather_adapter(pool: Pool) -> dict[str, torch.Tensor]:
    """Full adapter tensors on every rank (gathers only the pool parameters under ZeRO-3)."""
    import deepspeed

    params = [t.param for t in pool.tensors]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {t.name: t.param.detach().to("cpu", copy=True).reshape(t.shape) for t in pool.tensors}


def adapter_buffers(model) -> dict[str, torch.Tensor]:
    """Adapter buffers PEFT saves with the adapter (VeRA's shared projections); ZeRO never partitions buffers."""
    return {n: b.detach().cpu() for n, b in model.named_buffers(remove_duplicate=False) if n.endswith(".default")}


def key_map(model, names: list[str]) -> dict[str, str]:
    """Parameter name -> the key PEFT writes for it into adapter_model.safetensors (a model PEFT did not build, i.e.
    fishds' own adapters, PeftMethod.own_adapter: the parameter name itself)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    if not isinstance(model, PeftModel):
        return {n: n for n in names}  # fishds' bottleneck adapters are saved under their parameter names
    markers = {n: torch.tensor([i, -7], dtype=torch.int64) for i, n in enumerate(names)}
    renamed = get_peft_model_state_dict(model, state_dict={**adapter_buffers(model), **markers})
    return {
        names[int(v[0])]: k
        for k, v in renamed.items()
        if v.dtype == torch.int64 and v.shape == (2,) and int(v[1]) == -7
    }


def adapter_keys(model, by_param_name: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename parameter-name keys to the keys PEFT writes into adapter_model.safetensors."""
    names = list(by_param_name)
    return {key: by_param_name[name] for name, key in key_map(model, names).items()}


def save_mask_file(model, out: Path, masks) -> None:
    """The mask file, keyed like the adapter (masks: a dict of boolean tensors or PackedMasks, kept packed)."""
    keyed = masks.renamed(key_map(model, list(masks))) if isinstance(masks, PackedMasks) else adapter_keys(model, masks)
    atomic(out / MASK_FILE, lambda t: save_masks(t, keyed))


def save_initial_adapter(model, out: Path, adapter: dict[str, torch.Tensor]) -> None:
    keyed = {k: v.contiguous() for k, v in adapter_keys(model, adapter).items()}
    atomic(out / INIT_ADAPTER_FILE, lambda t: save_file(keyed, str(t), metadata={"format": "pt"}))


def mask_report(pool: Pool, masks: dict[str, torch.Tensor]) -> dict:
    """Per-tensor and per-module counts and the lora_A / lora_B shares of the mask (keys read by keys.parse_key)."""
    per_tensor, per_module, per_kind = {}, {}, {"lora_A": 0, "lora_B": 0, OTHER: 0}
    total = 0
    for t in pool.tensors:
        sel = int(masks[t.name].sum())
        total += sel
        per_tensor[t.name] = {"selected": sel, "numel": t.numel}
        info = parse_key(t.name)
        m = per_module.setdefault(info.module, {"selected": 0, "numel": 0})
        m["selected"] += sel
        m["numel"] += t.numel
        per_kind[info.kind] += sel
    share = {k: (v / total if total else 0.0) for k, v in per_kind.items() if k != OTHER or v}
    from .allocation import allocation_report  # per layer, per adapted module, row/column coverage

    return {
        "selected": total,
        "per_tensor": per_tensor,
        "per_module": per_module,
        "share": share,
        **allocation_report(pool, masks),
    }

"""The adapter as the FISH method sees it: gathered full tensors, the keys PEFT writes them under, and the
files keyed like the adapter (the mask file, the initial adapter), plus the mask's per-module report.

Used by both clients of the method core (`fishds train` and the Hugging Face callback).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files import INIT_ADAPTER_FILE, MASK_FILE, atomic
from .keys import OTHER, kind_of, parse_key
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


@torch.no_grad()
def rank_sliced(model, adapter: dict[str, torch.Tensor], masks) -> tuple[dict[str, torch.Tensor], int]:
    """The adapter of fish.allocation=rank as a plain LoRA of rank r_keep: each module's unselected components
    (lora_B column 0, never trained, so they add nothing) sliced away, and lora_B multiplied by
    scaling(r_pool) / scaling(r_keep) so that the saved adapter (adapter_config.json r = r_keep, the same alpha;
    scaling alpha / r, or alpha / sqrt(r) with rsLoRA) computes the trained model's function. Returns the sliced
    tensors (parameter names) and r_keep."""
    cfg = model.peft_config["default"]
    out, r_keep = dict(adapter), None
    for name, b in adapter.items():
        if kind_of(name) != "lora_B":
            continue
        keep = masks[name].reshape(b.shape).any(0).nonzero().view(-1)
        dropped = torch.ones(b.shape[1], dtype=torch.bool)
        dropped[keep] = False
        if bool(b[:, dropped].any()):
            raise ValueError(f"{name}: an unselected rank component is not 0; it cannot be sliced away")
        if r_keep not in (None, keep.numel()):
            raise ValueError(f"{name}: {keep.numel()} components kept where other modules keep {r_keep}")
        r_keep, r_pool = keep.numel(), b.shape[1]
        ratio = r_keep / r_pool
        factor = ratio**0.5 if getattr(cfg, "use_rslora", False) else ratio
        out[name] = (b[:, keep].to(torch.float32) * factor).to(b.dtype).contiguous()
        a_name = name.replace(".lora_B.", ".lora_A.")
        out[a_name] = adapter[a_name][keep].contiguous()
    return out, r_keep


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

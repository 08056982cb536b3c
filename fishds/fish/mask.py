"""FISH masks: packed bits, their distribution to every rank, and the fishds-packbits-v1 file format.

File format (`fish_mask.safetensors`): for every adapter tensor, under the same key as in
adapter_model.safetensors, the uint8 result of `numpy.packbits` (big bit order) of the flattened
boolean mask; the safetensors metadata holds {"format": "fishds-packbits-v1", <key>: "[d0, d1]"}.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from .. import dist as fdist
from .pool import Pool

FORMAT = "fishds-packbits-v1"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """numpy.packbits of a flattened boolean tensor (big bit order, zero-padded to whole bytes)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = packed.reshape(-1, 1).bitwise_and(_BITS).ne(0)
    return bits.reshape(-1)[:numel]


def share_selection(pool: Pool, local_selected: torch.Tensor) -> dict[str, torch.Tensor]:
    """All-gather every rank's selected chunk as packed bits; return full boolean masks per tensor name.

    Traffic per rank: pool size / 8 bytes (chunks are multiples of 8 entries, so they concatenate).
    """
    world = fdist.world_size()
    packed = pack_bits(local_selected)
    per = -(-(-(-pool.size // world)) // 8)  # bytes of the largest chunk
    buf = torch.zeros(per, dtype=torch.uint8, device=fdist.comm_device())
    buf[:packed.numel()] = packed.to(buf.device)
    if world > 1:
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf)
        parts = [p.cpu() for p in parts]
    else:
        parts = [buf]
    chunks = []
    for r, part in enumerate(parts):
        start, end = pool.chunk(r, world)
        chunks.append(unpack_bits(part, end - start))
    full = torch.cat(chunks)
    return {name: m.clone() for name, m in pool.split(full).items()}


def save_masks(path: str | Path, masks: dict[str, torch.Tensor]) -> None:
    """Write masks (key -> boolean tensor of the adapter tensor's shape) in fishds-packbits-v1."""
    meta = {"format": FORMAT}
    tensors = {}
    for key, m in masks.items():
        tensors[key] = pack_bits(m.cpu()).contiguous()
        meta[key] = json.dumps(list(m.shape))
    save_file(tensors, str(path), metadata=meta)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a fishds-packbits-v1 file; returns key -> boolean tensor of the recorded shape."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a fishds mask file (metadata format={meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        out = {}
        for key in f.keys():
            shape = json.loads(meta[key])
            numel = 1
            for d in shape:
                numel *= d
            out[key] = unpack_bits(f.get_tensor(key), numel).view(shape)
        return out

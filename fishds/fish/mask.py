"""FISH masks: packed bits, their distribution to every rank, and the fishds-packbits-v1 file format.

In memory a rank holds the masks packed as well (PackedMasks: 1 bit per pool entry, the file's layout); reading
a tensor's mask unpacks that tensor only, e.g. inside the gradient hook of fishds/fish/enforce.py.

File format (`fish_mask.safetensors`): for every adapter tensor, under the same key as in
adapter_model.safetensors, the uint8 result of `numpy.packbits` (big bit order) of the flattened
boolean mask; the safetensors metadata holds {"format": "fishds-packbits-v1", <key>: "[d0, d1]"}.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


_TABLES: dict = {}  # (device, invert) -> (256, 8) bool: the bits of every byte value


def unpack_bits(packed: torch.Tensor, numel: int, invert: bool = False) -> torch.Tensor:
    """The first `numel` booleans of packed bits (invert: their negation, without a second pass); one table
    lookup per byte (about 2x faster than masking each bit, which matters in the per-step gradient hook)."""
    key = (str(packed.device), invert)
    if key not in _TABLES:
        bits = torch.arange(256, dtype=torch.uint8).reshape(-1, 1).bitwise_and(_BITS)
        _TABLES[key] = (bits.eq(0) if invert else bits.ne(0)).to(packed.device)
    return _TABLES[key].index_select(0, packed.reshape(-1).int()).reshape(-1)[:numel]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class PackedMasks(Mapping):
    """Boolean masks held at 1 bit per entry: name -> packed uint8 (pack_bits layout) and the tensor's shape.

    A read-only mapping: masks[name] unpacks that one tensor into a new bool tensor of its shape, so code written
    for a dict of boolean tensors keeps working while the rank holds only the bits (`nbytes`).
    """

    def __init__(self, packed: dict[str, tuple[torch.Tensor, tuple[int, ...]]]):
        self._packed = packed

    @classmethod
    def of(cls, masks: Mapping, device=None) -> "PackedMasks":
        """Pack a dict of boolean tensors (one at a time), or return / move an existing PackedMasks."""
        if isinstance(masks, PackedMasks):
            if device is None or all(p.device == torch.device(device) for p, _ in masks._packed.values()):
                return masks
            return cls({n: (p.to(device), s) for n, (p, s) in masks._packed.items()})
        return cls(
            {
                n: (pack_bits(m.bool()) if device is None else pack_bits(m.bool()).to(device), tuple(m.shape))
                for n, m in masks.items()
            }
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        p, shape = self._packed[name]
        return unpack_bits(p, _numel(shape)).view(shape)

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def packed(self, name: str) -> torch.Tensor:
        return self._packed[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._packed[name][1]

    def frozen(self, name: str, start: int = 0, n: int | None = None) -> torch.Tensor:
        """Flat booleans, True where the mask is 0, for flat indices [start, start + n) of the tensor; indices past
        its end (ZeRO-3 partition padding) read False (not frozen). Unpacks only the bytes covering the range."""
        p, shape = self._packed[name]
        total = _numel(shape)
        n = total - start if n is None else n
        inside = max(0, min(n, total - start))
        out = unpack_bits(p[start // 8 : -(-(start + inside) // 8)], start % 8 + inside, invert=True)[start % 8 :]
        if inside < n:
            out = torch.cat([out, out.new_zeros(n - inside)])
        return out

    def renamed(self, names: dict[str, str]) -> "PackedMasks":
        """The same bits under new keys: names maps old -> new."""
        return PackedMasks({new: self._packed[old] for old, new in names.items()})

    def completed(self, shapes: list[tuple[str, tuple[int, ...]]]) -> "PackedMasks":
        """These masks for exactly the given (name, shape) list, all ones for a name not held."""
        return PackedMasks(
            {n: self._packed.get(n) or (pack_bits(torch.ones(s, dtype=torch.bool)), tuple(s)) for n, s in shapes}
        )

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p, _ in self._packed.values())


def share_selection(pool: Pool, local_selected: torch.Tensor) -> PackedMasks:
    """All-gather every rank's selected chunk as packed bits; return the full masks per tensor name (packed).

    Traffic per rank: pool size / 8 bytes (chunks are multiples of 8 entries, so they concatenate).
    """
    world = fdist.world_size()
    packed = pack_bits(local_selected)
    per = -(-(-(-pool.size // world)) // 8)  # bytes of the largest chunk
    buf = torch.zeros(per, dtype=torch.uint8, device=fdist.comm_device())
    buf[: packed.numel()] = packed.to(buf.device)
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
    return PackedMasks.of(pool.split(full))


def save_masks(path: str | Path, masks: Mapping) -> None:
    """Write masks (key -> boolean tensor of the adapter tensor's shape) in fishds-packbits-v1."""
    meta = {"format": FORMAT}
    tensors = {}
    for key in masks:
        if isinstance(masks, PackedMasks):  # already the file's bits
            tensors[key], shape = masks.packed(key).cpu().contiguous(), masks.shape(key)
        else:
            tensors[key], shape = pack_bits(masks[key].cpu()).contiguous(), masks[key].shape
        meta[key] = json.dumps(list(shape))
    save_file(tensors, str(path), metadata=meta)


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a fishds-packbits-v1 file; returns key -> boolean tensor of the recorded shape."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a fishds mask file (metadata format={meta.get('format')!r}, expected {FORMAT!r})"
            )
        out = {}
        for key in f.keys():
            shape = json.loads(meta[key])
            numel = 1
            for d in shape:
                numel *= d
            out[key] = unpack_bits(f.get_tensor(key), numel).view(shape)
        return out

"""The FISH pool: the trainable adapter tensors, in one fixed global order.

Every entry of the pool has a global index: tensors sorted by parameter name, then row-major flat
index inside the tensor. That order breaks ties in the top-k, so the mask does not depend on the
number of ranks. For the distributed selection the pool is cut into contiguous chunks, one per
rank, each a multiple of 8 entries long so that packed bit masks concatenate without shifting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..zero import full_shape


@dataclass(frozen=True)
class PoolTensor:
    name: str  # parameter name in the PEFT model, e.g. base_model.model...q_proj.lora_A.default.weight
    param: torch.nn.Parameter
    shape: tuple[int, ...]  # full shape (also under ZeRO-3, where param.data is a shard)
    offset: int  # global index of the first entry

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class Pool:
    """Ordered candidate tensors for the mask (by default every trainable parameter)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]):
        tensors, offset = [], 0
        for name, p in sorted(named_params, key=lambda np_: np_[0]):
            t = PoolTensor(name, p, full_shape(p), offset)
            tensors.append(t)
            offset += t.numel
        if not tensors:
            raise ValueError("the FISH pool is empty: the model has no trainable adapter parameters")
        self.tensors = tensors
        self.size = offset

    @classmethod
    def from_model(cls, model: torch.nn.Module, include=(), exclude=()) -> "Pool":
        """Trainable parameters whose name matches an `include` regex (all if none) and no `exclude` regex."""
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad
            and (not include or any(re.search(pat, n) for pat in include))
            and not any(re.search(pat, n) for pat in exclude)
        ]
        if not named:
            raise ValueError(
                f"the FISH pool is empty: no trainable tensor matches fish.pool_include={list(include)} "
                f"minus fish.pool_exclude={list(exclude)}"
            )
        return cls(named)

    def chunk(self, rank: int, world: int) -> tuple[int, int]:
        """[start, end) of the global indices owned by `rank` for scoring and selection."""
        per = -(-self.size // world)
        per = -(-per // 8) * 8
        start = min(rank * per, self.size)
        return start, min(start + per, self.size)

    def tensor_at(self, index: int) -> PoolTensor:
        """The pool tensor holding global index `index`."""
        for t in self.tensors:
            if t.offset <= index < t.offset + t.numel:
                return t
        raise IndexError(index)

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a full-pool flat vector into per-tensor views of full shape, keyed by parameter name."""
        return {t.name: flat[t.offset : t.offset + t.numel].view(t.shape) for t in self.tensors}

    def flatten(self, by_name: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([by_name[t.name].reshape(-1) for t in self.tensors])

    @staticmethod
    def freeze_matching(model: torch.nn.Module, patterns) -> list[str]:
        """fish.freeze: set requires_grad=False on every trainable tensor whose name matches a pattern (before the
        engine is built, so no optimizer state or gradient exists for them); returns their names."""
        frozen = [n for n, p in model.named_parameters() if p.requires_grad and any(re.search(x, n) for x in patterns)]
        for n, p in model.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        return frozen

    @classmethod
    def named(cls, model: torch.nn.Module, names) -> "Pool | None":
        """The tensors of `model` with these names (e.g. fish.freeze's, to save them with the adapter), or None."""
        names = set(names)
        named = [(n, p) for n, p in model.named_parameters() if n in names]
        return cls(named) if named else None

    def num_selected(self, keep_ratio: float | None, num_selected: int | None) -> int:
        """k from the config: floor(keep_ratio * pool size) or the absolute count, checked against the pool."""
        if num_selected is not None:
            if not 1 <= num_selected <= self.size:
                raise ValueError(f"fish.num_selected={num_selected} must be between 1 and the pool size {self.size}")
            return num_selected
        k = int(keep_ratio * self.size)
        if k < 1:
            raise ValueError(
                f"fish.keep_ratio={keep_ratio} selects no entry of a pool of {self.size}; "
                "raise it or use fish.num_selected"
            )
        return k

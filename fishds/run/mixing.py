"""Several training datasets in one run (data.datasets), or the one of data.path.

Each source is (key, path, its data settings, weight): data.datasets[i] inherits every data key it does not set
from the data section. Each source is checked and tokenised with its own settings (fishds/run/data.py); the mix
holds each source `weight` times: the integer part as whole copies, the fraction as a seeded sample of that source
(MIX_SEED, the same for every train.seed), then shuffled with the same fixed seed (`mix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, DataSection
from .examples import Picked

MIX_SEED = 0
ENTRY_KEYS = (
    "format",
    "text_field",
    "label_field",
    "messages_field",
    "role_field",
    "content_field",
    "role_map",
    "chat_template",
    "train_turns",
    "max_examples",
    "subset",
    "split",
    "data_files",
)


@dataclass
class Source:
    key: str  # the config key of its path, for messages: data.path or data.datasets[i].path
    path: str
    data: DataSection  # the data settings this source is read and tokenized with
    weight: float = 1.0


def sources(d: DataSection, data_path: str | None = None) -> list[Source]:
    """The training sources: data.path (data_path: a built-in task's file, from preflight) or each data.datasets
    entry (nothing is read here)."""
    if not d.datasets:
        return [Source("data.path", data_path or d.path, d)]
    out = []
    base = d.model_dump(exclude={"datasets", "path"})
    for i, e in enumerate(d.datasets):
        key = f"data.datasets[{i}].path"
        own = {k: getattr(e, k) for k in ENTRY_KEYS if getattr(e, k) is not None}
        try:
            data = DataSection(**{**base, **own, "path": e.path})
        except ValueError as err:
            raise ConfigError(f"data.datasets[{i}]: {err}") from None
        out.append(Source(key, e.path, data, e.weight))
    return out


def mix(per_source: list, weights: list[float], seed: int = MIX_SEED):
    """Each source `weight` times (whole copies, then a seeded sample for the fraction), shuffled (fixed seed); a
    sequence of picks from the sources (no example is copied)."""
    if len(per_source) == 1 and weights == [1.0]:
        return per_source[0]
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for a, (examples, w) in enumerate(zip(per_source, weights)):
        n = len(examples)
        whole, frac = divmod(w, 1.0)
        rows = [np.tile(np.arange(n), int(whole))]
        k = round(frac * n)
        if k:
            rows.append(np.sort(torch.randperm(n, generator=g)[:k].numpy()))
        rows = np.concatenate(rows)
        pairs.append(np.stack([np.full(len(rows), a), rows], axis=1))
    pairs = np.concatenate(pairs)
    if not len(pairs):
        raise ConfigError("data.datasets: the weights leave no training example; raise a weight")
    return Picked(per_source, pairs[torch.randperm(len(pairs), generator=g).numpy()])

"""Several training datasets in one run (data.datasets), or the one of data.path.

Each source is (key, path, its data settings, weight): data.datasets[i] inherits every data key it does not set
from the data section. Rows are checked per source before weights load (`read_sources`); once tokenized, the mix
holds each source `weight` times: the integer part as whole copies, the fraction as a seeded sample of that source
(MIX_SEED, the same for every train.seed), then shuffled with the same fixed seed (`mix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ConfigError, DataSection
from .examples import Picked
from .formats import label_list

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
)


@dataclass
class Source:
    key: str  # the config key of its path, for messages: data.path or data.datasets[i].path
    path: str
    data: DataSection  # the data settings this source is read and tokenized with
    weight: float = 1.0


def sources(d: DataSection, data_path: str | None = None) -> list[Source]:
    """The training sources: data.path (data_path: resolved by preflight) or each data.datasets entry."""
    from ..hub import resolve_dataset

    if not d.datasets:
        path = data_path or d.path
        return [Source("data.path", resolve_dataset(path, "data.path"), d)]
    out = []
    base = d.model_dump(exclude={"datasets", "path"})
    for i, e in enumerate(d.datasets):
        key = f"data.datasets[{i}].path"
        own = {k: getattr(e, k) for k in ENTRY_KEYS if getattr(e, k) is not None}
        try:
            data = DataSection(**{**base, **own, "path": e.path})
        except ValueError as err:
            raise ConfigError(f"data.datasets[{i}]: {err}") from None
        out.append(Source(key, resolve_dataset(e.path, key), data, e.weight))
    return out


def read_sources(srcs: list[Source]) -> list[tuple[Source, list[dict]]]:
    """Every source's rows, each checked against its own format (no tokenizer, no weights)."""
    from .data import read_rows

    return [(s, read_rows(s.path, s.key, s.data, s.data.max_examples)) for s in srcs]


def labels_of(read: list[tuple[Source, list[dict]]]) -> list:
    """Classification: the sorted distinct labels over all sources (each source's own data.label_field)."""
    if len(read) == 1:
        return label_list(read[0][1], read[0][0].data)
    rows = [{"label": r[s.data.label_field]} for s, rs in read for r in rs]
    return label_list(rows, DataSection(path="-", label_field="label", format="classification"))


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

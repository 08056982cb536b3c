"""Tokenized examples kept in the memory-mapped arrow file datasets wrote, not as Python lists on every rank.

`ArrowExamples` is a read-only sequence over the usable rows of the tokenization cache (an arrow file that
`datasets.Dataset.from_file` memory-maps): it holds the file mapping and an int64 index of the rows it shows
(8 bytes per example); an item becomes a Python dict {"input_ids", "labels"} only when it is read (a micro-batch,
a Fisher example). The operating system shares the mapped pages between the ranks of a machine and can drop them.
`Picked` is a sequence of items picked from several sequences by (part, row) pairs (data.datasets mixes).
`Packed` is a sequence of packed blocks (data.packing), each a run of consecutive examples of another sequence,
held as the block boundaries only (8 bytes per block): a block's tokens are concatenated when it is read.
All compare equal to a list with the same items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class _Items(Sequence):
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._item(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._item(int(i))

    def __eq__(self, other):
        return isinstance(other, Sequence) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None


class ArrowExamples(_Items):
    """The rows `index` of a memory-mapped datasets.Dataset with columns input_ids and labels."""

    def __init__(self, dataset, index: np.ndarray):
        self.dataset, self.index = dataset.select_columns(["input_ids", "labels"]), np.asarray(index, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def _item(self, i: int) -> dict:
        return self.dataset[int(self.index[i])]

    def select(self, positions) -> "ArrowExamples":
        """The items at these positions (a view: no token is copied)."""
        view = ArrowExamples.__new__(ArrowExamples)
        view.dataset, view.index = self.dataset, self.index[np.asarray(positions, np.int64)]
        return view


class Packed(_Items):
    """Blocks of consecutive examples of `examples`: block i is examples[starts[i]:starts[i + 1]] back to back, with
    `seq_lens` (their lengths) and each example's first label set to -100 (fishds/run/formats.pack)."""

    def __init__(self, examples, starts: np.ndarray):
        self.examples, self.starts = examples, np.asarray(starts, np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def _item(self, i: int) -> dict:
        ids, lab, lens = [], [], []
        for j in range(int(self.starts[i]), int(self.starts[i + 1])):
            e = self.examples[j]
            ids.extend(e["input_ids"])
            lab.extend([-100, *e["labels"][1:]])
            lens.append(len(e["input_ids"]))
        return {"input_ids": ids, "labels": lab, "seq_lens": lens}


def lengths(examples) -> np.ndarray:
    """The token count of every example, read from the arrow columns when the examples live there (no item is
    built)."""
    if isinstance(examples, ArrowExamples):
        import pyarrow.compute as pc

        col = examples.dataset.data.column("input_ids")
        all_lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if examples.dataset._indices is not None:  # a datasets view (select) over the file: map its rows
            all_lengths = all_lengths[examples.dataset._indices.column(0).to_numpy()]
        return all_lengths[examples.index].astype(np.int64)
    if isinstance(examples, Picked):
        per_part = [lengths(p) for p in examples.parts]
        return np.array([per_part[a][b] for a, b in examples.pairs], np.int64)
    return np.array([len(e["input_ids"]) for e in examples], np.int64)


class Picked(_Items):
    """Items parts[a][b] for the (a, b) rows of `pairs`."""

    def __init__(self, parts: list, pairs: np.ndarray):
        self.parts, self.pairs = parts, np.asarray(pairs, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    def _item(self, i: int) -> dict:
        a, b = self.pairs[i]
        return self.parts[int(a)][int(b)]


def subset(examples, positions: list[int]):
    """The examples at these positions, without copying tokens when they live in an arrow file."""
    if isinstance(examples, ArrowExamples):
        return examples.select(positions)
    if isinstance(examples, Picked):
        return Picked(examples.parts, examples.pairs[np.asarray(positions, np.int64)])
    return [examples[i] for i in positions]

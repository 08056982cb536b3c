"""Tokenized examples kept in the memory-mapped arrow file datasets wrote, not as Python lists on every rank.

`ArrowExamples` is a read-only sequence over the usable rows of the tokenization cache (an arrow file that
`datasets.Dataset.from_file` memory-maps): it holds the file mapping and an int64 index of the rows it shows
(8 bytes per example); an item becomes a Python dict {"input_ids", "labels"} only when it is read (a micro-batch,
a Fisher example). The operating system shares the mapped pages between the ranks of a machine and can drop them.
`Picked` is a sequence of items picked from several sequences by (part, row) pairs (data.datasets mixes).
Both compare equal to a list with the same items.
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
    return [examples[i] for i in positions]

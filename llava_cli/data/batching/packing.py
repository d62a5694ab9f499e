"""Cross-sample packing: records grouped into packs of at most a token budget, each pack one
row of a training batch with per-sample positions (`collator`), so that a step spends its
compute on tokens, not padding.

The packs are fixed for a run: made once from every record's token length (images counted by
their tokens; measured by the pre-training data check) and the seed, the same on every rank and
on resume. Their order is the Trainer's sampler's (random per epoch, or grouped by modality and
length), which is what makes a packed run resumable mid-epoch like an unpacked one: a pack is
just a bigger item. Everything is numpy: a 665k-record index costs two int64 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Packs:
    """Records in pack order (`order`) and where each pack starts in it (`starts`, one more
    entry than packs: pack k is `order[starts[k]:starts[k + 1]]`)."""

    order: np.ndarray
    starts: np.ndarray

    def __len__(self) -> int:
        return len(self.starts) - 1

    def members(self, k: int) -> np.ndarray:
        """The record positions of pack `k`."""
        return self.order[self.starts[k]:self.starts[k + 1]]


def pack_by_budget(lengths: np.ndarray, budget: int, seed: int,
                   modalities: np.ndarray | None = None) -> Packs:
    """Group record positions into packs whose token lengths sum to at most `budget`.

    Longest first, each pack topped up with the shortest records left (an O(n) two-pointer
    pass; tight for the long-tailed lengths of chat data). Records of equal length are taken in
    a seeded random order, so which short records join which long one depends on the seed.
    A record longer than the budget is a pack of its own. With `modalities` (e.g. "has an
    image"), each pack holds one modality only (for `group_by_modality_length`).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if budget < 1:
        raise ValueError(f"the packing budget must be at least 1 token, got {budget}")
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    groups = [shuffled] if modalities is None else [
        shuffled[np.asarray(modalities)[shuffled] == value]
        for value in np.unique(np.asarray(modalities))]
    order, sizes = [], []
    for group in groups:
        by_length = group[np.argsort(-lengths[group], kind="stable")]
        group_order, group_sizes = _two_pointer(lengths[by_length], budget)
        order.append(by_length[group_order])
        sizes.append(group_sizes)
    sizes_all = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes_all)]).astype(np.int64)
    order_all = np.concatenate(order).astype(np.int64) if order else np.zeros(0, np.int64)
    return Packs(order_all, starts)


def _two_pointer(descending: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into `descending` (lengths sorted longest first) in pack order, and the size of
    each pack: the longest record left, then the shortest ones while they fit."""
    values = descending.tolist()  # Python ints: this loop runs once per record
    head, tail = 0, len(values) - 1
    order, sizes = np.empty(len(values), np.int64), []
    filled = 0
    while head <= tail:
        start, total = filled, values[head]
        order[filled], filled, head = head, filled + 1, head + 1
        while head <= tail and total + values[tail] <= budget:
            total += values[tail]
            order[filled], filled, tail = tail, filled + 1, tail - 1
        sizes.append(filled - start)
    return order, np.asarray(sizes, np.int64)


class PackedDataset(Dataset):
    """A dataset whose item k is the list of samples of pack k (the collator lays them out).

    `lengths` are the records' token lengths; `modality_lengths` and `lengths` of the packs
    (summed) let the grouped samplers order packs as they order records.
    """

    def __init__(self, dataset: Any, packs: Packs, lengths: np.ndarray,
                 has_image: np.ndarray) -> None:
        self.dataset = dataset
        self.packs = packs
        sums = np.add.reduceat(np.asarray(lengths, np.int64)[packs.order], packs.starts[:-1]) \
            if len(packs) else np.zeros(0, np.int64)
        any_image = np.maximum.reduceat(np.asarray(has_image, bool)[packs.order].astype(np.int8),
                                        packs.starts[:-1]) if len(packs) else np.zeros(0, np.int8)
        self._lengths = sums
        self._signed = np.where(any_image > 0, sums, -sums)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[dict[str, Any]]:
        return [self.dataset[int(i)] for i in self.packs.members(int(k))]

    @property
    def lengths(self) -> np.ndarray:
        """Token lengths of the packs."""
        return self._lengths

    @property
    def modality_lengths(self) -> np.ndarray:
        """Signed pack lengths (>0 with an image record, <0 text only), as the records'."""
        return self._signed

    @property
    def records(self) -> int:
        """How many records the packs hold (the dataset's size)."""
        return len(self.packs.order)

    @property
    def index(self) -> Any:
        """The record index the packs were made from."""
        return self.dataset.index

"""Batches that are one modality each and of similar length (LLaVA's `group_by_modality_length`).

The original sorts lengths only inside a megabatch of `world_size × batch_size` samples, which
barely reduces padding; here samples are sorted inside groups of `group_batches` global
batches (as transformers' LengthGroupedSampler does), per modality, and the global batches are
then shuffled. Single-modality data works (the original crashed on it). Reproducible: the
order depends on the seed and the epoch only.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Yields indices so that each global batch holds one modality and similar lengths.

    `lengths` are LLaVA's signed lengths: > 0 for image records, < 0 for text-only ones.
    A global batch is `batch_size × world_size` consecutive indices; distributed loaders hand
    each rank one `batch_size` slice of it.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, world_size: int = 1, seed: int = 0,
                 group_batches: int = 50) -> None:
        self.lengths = np.asarray(lengths)
        self.global_batch = batch_size * world_size
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop so every epoch gets a new order."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def _batches(self, indices: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        indices = rng.permutation(indices)
        group = self.global_batch * self.group_batches
        batches = []
        for start in range(0, len(indices), group):
            chunk = indices[start:start + group]
            chunk = chunk[np.argsort(-np.abs(self.lengths[chunk]), kind="stable")]
            batches += [chunk[i:i + self.global_batch]
                        for i in range(0, len(chunk), self.global_batch)]
        return batches

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches, tails = [], []
        for modality in (self.lengths > 0, self.lengths <= 0):
            these = self._batches(np.flatnonzero(modality), rng)
            if these and len(these[-1]) < self.global_batch:
                tails.append(these.pop())  # incomplete batches go last, mixed together
            batches += these
        order = rng.permutation(len(batches))
        out = [batches[i] for i in order]
        if tails:
            out.append(np.concatenate(tails))
        return iter(int(i) for batch in out for i in batch)

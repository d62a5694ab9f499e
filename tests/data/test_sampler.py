"""Modality-length grouping: one modality per global batch, similar lengths, reproducible."""

from __future__ import annotations

import numpy as np

from llava_cli.data.batching.sampler import ModalityLengthGroupedSampler


def _batches(sampler, size):
    order = list(sampler)
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_every_index_once_and_batches_are_single_modality():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, 103) * rng.choice([-1, 1], 103)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(103))
    full = [b for b in _batches(sampler, 8) if len(b) == 8][:-1]  # the mixed tail is last
    for batch in full:
        signs = {bool(lengths[i] > 0) for i in batch}
        assert len(signs) == 1, batch


def test_groups_by_length_and_reduces_padding():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 1000, 800)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=8, seed=0)
    grouped = sum(max(lengths[b]) * len(b) for b in _batches(sampler, 8))
    shuffled = rng.permutation(800)
    random = sum(max(lengths[shuffled[i:i + 8]]) * 8 for i in range(0, 800, 8))
    assert grouped < 0.7 * random  # padding to the batch's longest costs far less


def test_single_modality_data_works_and_order_depends_on_seed_and_epoch():
    lengths = np.full(20, -7)  # text only: LLaVA's sampler crashed on this
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(20))
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=2, seed=5)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first

"""Packs to a token budget: every record once, within the budget, seeded, one modality each
when asked; and the collator's row-per-pack layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava_cli.data.batching.collator import DataCollator
from llava_cli.data.batching.packing import PackedDataset, pack_by_budget

LENGTHS = np.array([900, 40, 300, 1200, 50, 700, 2048, 10, 600, 100, 2500, 333])


def _packs(packs) -> list[list[int]]:
    return [packs.members(k).tolist() for k in range(len(packs))]


def test_every_record_is_in_exactly_one_pack_within_the_budget():
    packs = pack_by_budget(LENGTHS, 2048, seed=0)
    members = _packs(packs)
    assert sorted(i for pack in members for i in pack) == list(range(len(LENGTHS)))
    for pack in members:
        total = LENGTHS[pack].sum()
        # A record longer than the budget (2500) travels alone.
        assert total <= 2048 or len(pack) == 1, pack
    assert [2048] in [LENGTHS[p].tolist() for p in members]
    assert [10] not in [LENGTHS[p].tolist() for p in members]  # the short ones fill up
    assert len(packs) < len(LENGTHS) // 2 + 1


def test_packs_are_tight_on_long_tailed_lengths():
    lengths = np.random.default_rng(1).lognormal(5.5, 0.8, size=5000).astype(int).clip(8, 2048)
    packs = pack_by_budget(lengths, 2048, seed=0)
    fill = lengths.sum() / (len(packs) * 2048)
    assert fill > 0.9, fill


def test_packs_depend_on_the_seed_only():
    lengths = np.array([100] * 20 + [900] * 5)
    assert _packs(pack_by_budget(lengths, 1000, seed=3)) == \
        _packs(pack_by_budget(lengths, 1000, seed=3))
    assert _packs(pack_by_budget(lengths, 1000, seed=3)) != \
        _packs(pack_by_budget(lengths, 1000, seed=4))


def test_packs_hold_one_modality_when_asked():
    has_image = np.array([True, False] * 6)
    packs = pack_by_budget(LENGTHS, 2048, seed=0, modalities=has_image)
    for pack in _packs(packs):
        assert len(set(has_image[pack].tolist())) == 1, pack
    dataset = PackedDataset(list(range(len(LENGTHS))), packs, LENGTHS, has_image)
    signed = dataset.modality_lengths
    for k, pack in enumerate(_packs(packs)):
        assert abs(signed[k]) == LENGTHS[pack].sum()
        assert (signed[k] > 0) == bool(has_image[pack[0]])
    assert dataset[0] == _packs(packs)[0] and dataset.records == len(LENGTHS)


def test_a_budget_below_one_token_is_refused():
    with pytest.raises(ValueError, match="at least 1 token"):
        pack_by_budget(LENGTHS, 0, seed=0)


def _sample(ids, labels):
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


def test_a_row_per_pack_with_restarting_positions_and_padding_as_its_own_block():
    a, b = _sample([1, 5, 6], [-100, 5, 6]), _sample([1, 7], [9, 7])
    c = _sample([1, 8, 9, 10], [-100, -100, 9, 10])
    batch = DataCollator(pad_token_id=0, pack_rows=True)([[a, b], [c]])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [1, 8, 9, 10, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, -100, 9, 10, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert "attention_mask" not in batch


def test_without_pack_rows_a_packs_samples_are_padded_rows():
    a, b = _sample([1, 5, 6], [-100, 5, 6]), _sample([1, 7], [9, 7])
    batch = DataCollator(pad_token_id=0)([[a, b]])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]

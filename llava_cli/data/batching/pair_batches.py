"""Preference pairs → one batch: the chosen rows, then the rejected rows, padded together.

The images of the batch appear once (the chosen rows' order): the trainer encodes them once
and hands the features to both halves (`train.dpo.pair_forward`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_cli.data.batching.collator import DataCollator

CARRIED = ("pixel_values", "image_sizes", "dropped", "record_errors")


@dataclass
class PairCollator:
    """`rows` pads and builds masks (the supervised collator, unpacked); `record_index` goes
    along (not a model input) for precomputed reference log-probs."""

    rows: DataCollator

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Collate preference items (`data.dataset.PreferenceDataset`) into 2B rows."""
        chosen = [{"input_ids": item["chosen_input_ids"], "labels": item["chosen_labels"],
                   **{key: item[key] for key in CARRIED if key in item}} for item in items]
        rejected = [{"input_ids": item["rejected_input_ids"], "labels": item["rejected_labels"]}
                    for item in items]
        batch = self.rows([*chosen, *rejected])
        batch["record_index"] = torch.tensor([item["record_index"] for item in items])
        return batch

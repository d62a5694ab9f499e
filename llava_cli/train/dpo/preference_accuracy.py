"""Held-out preference accuracy: how often a model gives the chosen reply a higher
log-probability than the rejected one (summed over the reply's tokens, no reference).

The pairs are built as training builds them (`train.stages.preference`: the run's template,
image policy and masking), so the number measures what the preference stage optimises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llava_cli.config.run_config import RunConfig
from llava_cli.train.dpo.pair_forward import encode_images, reply_forward


@dataclass(frozen=True)
class PreferenceScore:
    """Pairs ranked right (chosen above rejected) out of all pairs."""

    right: int
    pairs: int

    @property
    def accuracy(self) -> float:
        """The share ranked right (0 for no pairs)."""
        return self.right / self.pairs if self.pairs else 0.0


def preference_accuracy(model: Any, processor: Any, config: RunConfig, batch_size: int = 16
                        ) -> PreferenceScore:
    """Score every pair of `config.data_path` with `model` (eval mode, no gradients)."""
    from llava_cli.train.stages import preference

    dataset, _ = preference.datasets(config.model_copy(update={"eval_data_path": None}),
                                     model, processor)
    collate = preference.collator(config, processor)
    device = next(model.parameters()).device
    was_training, right = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
                batch = {key: value.to(device) if torch.is_tensor(value) else value
                         for key, value in collate(items).items()}
                found = reply_forward(model, batch, encode_images(model, batch))
                right += int((found.chosen() > found.rejected()).sum())
    finally:
        model.train(was_training)
    return PreferenceScore(right, len(dataset))

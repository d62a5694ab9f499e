"""Samples → a padded batch for `LlavaForConditionalGeneration` (and LLaVA-NeXT).

Padding goes to the longest sample of the batch, never to `model_max_length`: most batches are
far shorter, and padding them wastes most of the compute. `padding_free` goes further: the
samples are laid end to end in one row with per-sample position ids and no attention mask, from
which transformers builds a block-diagonal causal mask (sdpa, eager, flex) or varlen calls
(flash-attention), so no position is spent on padding and no sample sees another.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava_cli.data.text.encoding import IGNORE_INDEX


@dataclass
class DataCollator:
    """Pads `input_ids` (with `pad_token_id`) and `labels` (with -100), builds `attention_mask`
    and concatenates the images of the samples that have any.

    `pad_to_multiple_of` rounds the padded length up (tensor-core friendly shapes), but never
    past `max_length`. A sample longer than `max_length` is an error, never cut here: cutting
    could split a run of image tokens, which the dataset's truncation is careful not to do.
    With `padding_free`, the batch is one
    packed row (`input_ids`, `labels`, `position_ids` of shape [1, total]); each sample's first
    label is masked so that no position is trained to predict across a sample boundary.
    Records the dataset dropped on the way to these samples are passed on (not a model input)
    as "dropped_records", for the trainer to total.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    padding_free: bool = False
    # Items that are packs (lists of samples, `packing.PackedDataset`): one row per pack, its
    # samples end to end with restarting positions. Without it (and without padding_free) a
    # pack's samples become padded rows of their own: the unpacked computation of that step.
    pack_rows: bool = False

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, items: Sequence[dict[str, Any] | list[dict[str, Any]]]
                 ) -> dict[str, torch.Tensor]:
        """Collate samples (or packs of samples) into model inputs (`record_index` is left
        out: not a model input)."""
        packs = [item if isinstance(item, list) else [item] for item in items]
        samples = [sample for pack in packs for sample in pack]
        length = self._padded_length([len(s["input_ids"]) for s in samples])
        dropped = [drop for s in samples for drop in s.get("dropped", ())]
        extra = {"dropped_records": dropped} if dropped else {}
        errors = [error for s in samples for error in s.get("record_errors", ())]
        if errors:  # raised by the trainer in the main process (see the dataset)
            extra["record_errors"] = errors
        if self.padding_free:
            return {**_packed(samples), **_images(samples), **extra}
        if self.pack_rows:
            return {**self._pack_rows(packs), **_images(samples), **extra}
        batch = {
            "input_ids": self._pad([s["input_ids"] for s in samples], length, self.pad_token_id),
            "labels": self._pad([s["labels"] for s in samples], length, IGNORE_INDEX),
        }
        mask = [torch.ones(len(s["input_ids"]), dtype=torch.long) for s in samples]
        batch["attention_mask"] = self._pad(mask, length, 0)
        batch.update(_images(samples))
        return {**batch, **extra}

    def _padded_length(self, lengths: list[int]) -> int:
        longest = max(lengths)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"a sample has {longest} tokens, more than max_length "
                             f"{self.max_length}; set the dataset's model_max_length to match")
        multiple = self.pad_to_multiple_of
        if multiple:
            longest = -(-longest // multiple) * multiple
        return min(longest, self.max_length) if self.max_length is not None else longest

    def _pad(self, rows: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), length), value, dtype=torch.long)
        for n, row in enumerate(rows):
            row = torch.as_tensor(row, dtype=torch.long)
            if self.padding_side == "right":
                out[n, : len(row)] = row
            else:
                out[n, length - len(row):] = row
        return out


    def _pack_rows(self, packs: list[list[dict[str, Any]]]) -> dict[str, torch.Tensor]:
        """One packed row per pack, padded to the longest. The padding gets positions of its
        own from 0, which makes it one more sample to the attention: nothing attends to it and
        it is never supervised, so no attention mask is needed (with one, transformers would
        stop reading the positions as sample boundaries)."""
        rows = [_packed(pack) for pack in packs]
        length = max(row["input_ids"].shape[1] for row in rows)
        multiple = self.pad_to_multiple_of
        if multiple:
            length = -(-length // multiple) * multiple
        out = {"input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
               "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long),
               "position_ids": torch.arange(length, dtype=torch.long).repeat(len(rows), 1)}
        for n, row in enumerate(rows):
            used = row["input_ids"].shape[1]
            for key in out:
                out[key][n, :used] = row[key][0]
            out["position_ids"][n, used:] -= used
        return out


def _packed(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The samples end to end in one row, positions restarting at 0 for each sample."""
    ids = [torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples]
    labels = [torch.as_tensor(s["labels"], dtype=torch.long).clone() for s in samples]
    for row in labels:
        row[0] = IGNORE_INDEX  # the previous sample's last position must not predict it
    positions = [torch.arange(len(row), dtype=torch.long) for row in ids]
    return {"input_ids": torch.cat(ids)[None], "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None]}


def _images(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """All images of the batch, in sample order: the model scatters image features into the
    image-token positions in order, so sample k's images must follow sample k-1's.
    Text-only samples contribute nothing; an all-text batch has no `pixel_values` at all.
    """
    with_images = [s for s in samples if s.get("pixel_values") is not None]
    if not with_images:
        return {}
    pixels = [s["pixel_values"] for s in with_images]
    if pixels[0].dim() == 5:  # anyres: [images, tiles, 3, H, W]; tile counts differ by shape
        pixels = _pad_tiles(pixels)
    out = {"pixel_values": torch.cat(pixels, dim=0)}
    sizes = [s["image_sizes"] for s in with_images if s.get("image_sizes") is not None]
    if sizes:
        if len(sizes) != len(with_images):
            raise ValueError("some image samples have image_sizes and others do not; use one "
                             "image processor for the whole dataset")
        out["image_sizes"] = torch.cat([torch.as_tensor(s) for s in sizes], dim=0)
    return out


def _pad_tiles(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zero-pad each image's tile axis to the batch maximum; the model reads the real tile
    count back from `image_sizes` and ignores the padding (as the HF processor pads)."""
    tiles = max(p.shape[1] for p in pixels)
    padded = []
    for p in pixels:
        if p.shape[1] < tiles:
            filler = p.new_zeros((p.shape[0], tiles - p.shape[1], *p.shape[2:]))
            p = torch.cat([p, filler], dim=1)
        padded.append(p)
    return padded

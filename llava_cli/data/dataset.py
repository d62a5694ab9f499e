"""The training dataset: record index → tokenized sample + processed images, one record at a time.

Nothing is tokenized or decoded up front: the index is numpy arrays of byte offsets, so start-up
is instant and forked DataLoader workers share it instead of copying millions of Python objects.
Records that cannot be trained on are replaced by the next usable record (and counted) only where
that is safe or the user asked for it (`skip_bad_records`); everything else raises with the
record id.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from llava_cli.data.conversation import RecordError
from llava_cli.data.problems import Dropped, Problem, ProblemCounter
from llava_cli.data.records import RecordFormatError
from llava_cli.data.samples import Sample, SampleBuilder
from llava_cli.data.sources.mix import Records, open_records

logger = logging.getLogger("llava_cli")

MAX_CONSECUTIVE_DROPS = 100


class LazySupervisedDataset(Dataset):
    """LLaVA records as model inputs: `input_ids`, `labels`, and `pixel_values` for image records.

    `processor` is an HF image processor (`CLIPImageProcessorPil`, `LlavaNextImageProcessorPil`,
    …) or None for text-only training. `skip_bad_records` turns a malformed record or an
    unreadable image into a dropped sample instead of an error; samples with no supervised
    token left (e.g. truncated away) are always dropped, since training on them teaches nothing.
    """

    def __init__(self, index: Records, builder: SampleBuilder, processor: Any | None = None,
                 skip_bad_records: bool = False) -> None:
        self.index = index
        self.builder = builder
        self.processor = processor
        self.skip_bad_records = skip_bad_records
        self.dropped = ProblemCounter()
        # The pid that already logged the "records were dropped" warning: one warning per
        # process (each forked worker has its own), so a long run's log is not flooded.
        self._warned_pid = -1

    @classmethod
    def open(cls, path: str | os.PathLike[str], builder: SampleBuilder,
             processor: Any | None = None, skip_bad_records: bool = False,
             cache_dir: str | os.PathLike[str] | None = None) -> LazySupervisedDataset:
        """Index the data at `path` (a LLaVA JSON/JSONL file, a mix file or one Arrow, Parquet
        or tar source: `sources.mix.open_records`) and wrap it."""
        return cls(open_records(path, cache_dir=cache_dir), builder, processor,
                   skip_bad_records)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def modality_lengths(self) -> np.ndarray:
        """LLaVA's signed lengths (>0 image records, <0 text-only) for the grouped sampler."""
        return self.index.modality_lengths()

    @property
    def lengths(self) -> np.ndarray:
        """Length estimates regardless of modality (for length-grouped sampling)."""
        return np.abs(self.modality_lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The model inputs of record `i`; a dropped record (see class doc) is replaced by the
        next usable one, so batches stay full and no step trains on nothing. The item lists
        the records dropped on the way under "dropped" (the trainer totals them at the end)."""
        i, dropped, errors = int(i), [], []
        for attempt in range(MAX_CONSECUTIVE_DROPS):
            try:
                item = self.inputs_or_drop((i + attempt) % len(self))
            except RecordError as err:
                if get_worker_info() is None:
                    raise
                # In a DataLoader worker the error would reach the user wrapped in a worker
                # traceback: it travels with the next item instead, and the trainer raises it
                # in the main process, the same error as without workers.
                errors.append((err.record_id, err.kind, err.detail))
                continue
            if isinstance(item, Dropped):
                dropped.append(item)
                continue
            if dropped:
                item["dropped"] = dropped
            if errors:
                item["record_errors"] = errors
            return item
        raise ValueError(f"{MAX_CONSECUTIVE_DROPS} consecutive records from #{i} cannot be "
                         "trained on; run `llava inspect-data --check` on the data")

    def inputs_or_drop(self, i: int) -> dict[str, Any] | Dropped:
        """The model inputs of record `i`, or why it is dropped (counted in `dropped`)."""
        try:
            sample = self.builder.build(self._read(i), position=i)
            if not sample.trainable:
                return self._drop(Dropped(i, Problem.FULLY_MASKED, sample.record_id))
            return self._to_inputs(sample, i)
        except RecordError as err:
            if not self.skip_bad_records:
                raise
            return self._drop(Dropped(i, err.kind, err.record_id))

    def _read(self, i: int) -> Any:
        try:
            return self.index.read(i)
        except RecordFormatError as err:
            # Only a record that is not valid JSON (raised from the JSON decoder) is that
            # record's fault; anything else (e.g. the file changed since indexing) would drop
            # every record, so it stays fatal.
            if err.__cause__ is None:
                raise
            raise RecordError(self.index.origin(i), Problem.BAD_JSON, str(err)) from err

    def _to_inputs(self, sample: Sample, position: int) -> dict[str, Any]:
        encoded = sample.encoded
        item: dict[str, Any] = {
            "input_ids": torch.from_numpy(encoded.ids),
            "labels": torch.from_numpy(encoded.label_ids),
            "record_index": position,
        }
        # Truncation may have cut whole image runs off the end: the model needs exactly one
        # image per remaining run, in order, or it fails on a features/tokens mismatch.
        images = sample.images[: len(encoded.image_spans)]
        if images:
            item.update(self._process_images(images, sample.record_id))
        return item

    def _process_images(self, images: list[Any], record_id: str) -> dict[str, torch.Tensor]:
        if self.processor is None:
            raise ValueError(f"record {record_id!r} has images but the dataset has no image "
                             "processor (text-only model?); remove image records or give a "
                             "vision model")
        try:
            out = self.processor(images=images, return_tensors="pt")
        except (ValueError, OSError) as err:
            raise RecordError(record_id, Problem.BAD_IMAGE,
                              f"image processor failed: {err}") from err
        result = {"pixel_values": out["pixel_values"].float()}
        if "image_sizes" in out:  # anyres processors: the model needs each image's size
            result["image_sizes"] = torch.as_tensor(out["image_sizes"], dtype=torch.long)
        return result

    def _drop(self, drop: Dropped) -> Dropped:
        self.dropped.add(drop.kind, drop.record_id)
        if self._warned_pid != os.getpid():
            self._warned_pid = os.getpid()
            logger.warning(
                "dropping record %r (%s) from training; further dropped records are counted, "
                "not logged, and totalled when training ends. `llava inspect-data --check` "
                "lists them all.", drop.record_id, drop.kind)
        return drop


class PreferenceDataset(LazySupervisedDataset):
    """Preference records as model inputs: `chosen_*` and `rejected_*` ids and labels (each
    reply alone supervised) and the pair's images once. `builder` is a
    `data.preference_pairs.PairBuilder`; dropping and bad-record handling are the supervised
    dataset's, a pair being usable when both replies are."""

    def _to_inputs(self, sample: Any, position: int) -> dict[str, Any]:
        item: dict[str, Any] = {"record_index": position}
        for side in ("chosen", "rejected"):
            encoded = getattr(sample, side).encoded
            item[f"{side}_input_ids"] = torch.from_numpy(encoded.ids)
            item[f"{side}_labels"] = torch.from_numpy(encoded.label_ids)
        # Both rows hold the same prompt, so truncation leaves both the same image runs.
        images = sample.images[: len(sample.chosen.encoded.image_spans)]
        if images:
            item.update(self._process_images(images, sample.record_id))
        return item

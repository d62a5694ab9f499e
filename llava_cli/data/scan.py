"""`inspect-data --check`: scan a whole dataset on every core and report what would go wrong.

Each worker process builds its own `SampleBuilder` once and scans contiguous slices of the
record index; images are checked by header only (existence, format, size), which is what
makes a full scan of a 665k-record file take minutes, not hours.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_cli.conversation import RecordError
from llava_cli.records import RecordFormatError, RecordIndex
from llava_cli.samples import SampleBuilder

EXAMPLES_PER_KIND = 5
FAILING_KINDS = ("fully-masked",)  # plus every error kind


@dataclass
class Report:
    """Counts of a scan; merged across worker processes."""

    records: int = 0
    image_records: int = 0
    text_only: int = 0
    multi_image: int = 0
    truncated: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)
    problems: Counter[str] = field(default_factory=Counter)  # errors and fully-masked
    notes: Counter[str] = field(default_factory=Counter)  # harmless fixes
    examples: dict[str, list[str]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # first message per kind

    def example(self, kind: str, record_id: str, message: str | None = None) -> None:
        """Remember up to a few record ids (and the first message) for a category."""
        ids = self.examples.setdefault(kind, [])
        if len(ids) < EXAMPLES_PER_KIND and record_id not in ids:
            ids.append(record_id)
        if message and kind not in self.messages:
            self.messages[kind] = message

    def merge(self, other: Report) -> None:
        """Add another worker's counts into this one."""
        for name in ("records", "image_records", "text_only", "multi_image", "truncated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths
        self.problems.update(other.problems)
        self.notes.update(other.notes)
        for kind, ids in other.examples.items():
            for record_id in ids:
                self.example(kind, record_id)
        for kind, message in other.messages.items():
            self.messages.setdefault(kind, message)

    @property
    def failed(self) -> bool:
        """True when any record would fail or train on nothing."""
        return sum(self.problems.values()) > 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report (`--format json`)."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        percentiles = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} \
            if len(lengths) else {}
        if len(lengths):
            percentiles["max"] = int(lengths.max())
        return {
            "records": self.records, "image_records": self.image_records,
            "text_only_records": self.text_only, "multi_image_records": self.multi_image,
            "length_tokens": percentiles, "truncated": self.truncated,
            "problems": dict(self.problems), "notes": dict(self.notes),
            "examples": self.examples, "first_messages": self.messages,
            "ok": not self.failed,
        }


def scan_records(builder: SampleBuilder, index: RecordIndex, start: int, stop: int) -> Report:
    """Scan records [start, stop) of `index` into a `Report`."""
    report = Report()
    lengths = []
    for position in range(start, stop):
        report.records += 1
        try:
            record = index.read(position)
        except RecordFormatError as err:
            report.problems["bad-json"] += 1
            report.example("bad-json", f"#{position}", str(err))
            continue
        _count_images(report, record)
        try:
            sample = builder.build(record, position, header_only=True)
        except RecordError as err:
            report.problems[err.kind] += 1
            report.example(err.kind, err.record_id, str(err))
            continue
        for note in sample.conversation.notes:
            report.notes[note] += 1
            report.example(note, sample.record_id)
        lengths.append(len(sample.encoded))
        if sample.encoded.truncated:
            report.truncated += 1
            report.example("truncated", sample.record_id)
        if not sample.trainable:
            report.problems["fully-masked"] += 1
            report.example("fully-masked", sample.record_id,
                           f"record {sample.record_id!r} has no supervised token after "
                           "tokenization/truncation; it would be dropped from training")
    report.lengths.append(np.asarray(lengths, dtype=np.int32))
    return report


def _count_images(report: Report, record: Any) -> None:
    # Both spellings, as `parse_record` reads them ("images": Mantis-style multi-image data).
    image = record.get("image", record.get("images")) if isinstance(record, dict) else None
    if not image:
        report.text_only += 1
        return
    report.image_records += 1
    if isinstance(image, list) and len(image) > 1:
        report.multi_image += 1


# Worker state: the parent's builder and index, handed to the pool initializer (fork
# inherits them for free; nothing is pickled per task but the slice bounds).
_worker: dict[str, Any] = {}


def _init_worker(builder: SampleBuilder, index: RecordIndex) -> None:
    _worker["builder"] = builder
    _worker["index"] = index


def _scan_slice(bounds: tuple[int, int]) -> Report:
    return scan_records(_worker["builder"], _worker["index"], *bounds)


def _slices(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def check_dataset(make_builder: Callable[[], SampleBuilder], index: RecordIndex,
                  workers: int | None = None, on_progress: Callable[[int], None] | None = None,
                  slice_size: int = 2000) -> Report:
    """Scan every record with `workers` processes (default: all cores) and merge the reports."""
    workers = workers or os.cpu_count() or 1
    report = Report()
    builder = make_builder()  # once, before forking: workers start scanning at once
    if workers <= 1 or len(index) <= slice_size:
        for bounds in _slices(len(index), slice_size):
            report.merge(scan_records(builder, index, *bounds))
            if on_progress:
                on_progress(bounds[1] - bounds[0])
        return report
    import multiprocessing

    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(builder, index)) as pool:
        for part in pool.map(_scan_slice, _slices(len(index), slice_size)):
            report.merge(part)
            if on_progress:
                on_progress(part.records)
    return report

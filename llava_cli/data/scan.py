"""One pass over records as training would read them, counted into a `Report`.

Used by `inspect-data --check` (on every core, `inspect.check`) and by training's pre-check of
held-out records. Images are checked by header only (existence, format, size), which is what
makes a full scan of a 665k-record file take minutes, not hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_cli.data.conversation import RecordError, has_image, image_field
from llava_cli.data.problems import Problem, ProblemCounter
from llava_cli.data.records import RecordFormatError, RecordIndex
from llava_cli.data.samples import SampleBuilder

EXAMPLES_PER_KIND = 5


def _counter() -> ProblemCounter:
    return ProblemCounter(max_examples=EXAMPLES_PER_KIND, distinct_examples=True)


@dataclass
class Report:
    """Counts of a scan; merged across worker processes."""

    records: int = 0
    image_records: int = 0
    text_only: int = 0
    multi_image: int = 0
    lengths: list[np.ndarray] = field(default_factory=list)
    problems: ProblemCounter = field(default_factory=_counter)  # errors and fully-masked
    notes: ProblemCounter = field(default_factory=_counter)  # harmless fixes
    truncations: ProblemCounter = field(default_factory=_counter)

    @property
    def truncated(self) -> int:
        """Records cut to model_max_length."""
        return self.truncations.total

    def merge(self, other: Report) -> None:
        """Add another worker's counts into this one."""
        for name in ("records", "image_records", "text_only", "multi_image"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths
        for name in ("problems", "notes", "truncations"):
            getattr(self, name).merge(getattr(other, name))

    @property
    def failed(self) -> bool:
        """True when any record would fail or train on nothing."""
        return self.problems.total > 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report (`--format json`)."""
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        percentiles = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} \
            if len(lengths) else {}
        if len(lengths):
            percentiles["max"] = int(lengths.max())
        examples = {**self.problems.examples, **self.notes.examples,
                    **self.truncations.examples}
        return {
            "records": self.records, "image_records": self.image_records,
            "text_only_records": self.text_only, "multi_image_records": self.multi_image,
            "length_tokens": percentiles, "truncated": self.truncated,
            "problems": dict(self.problems.counts), "notes": dict(self.notes.counts),
            "examples": examples, "first_messages": dict(self.problems.messages),
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
            report.problems.add(Problem.BAD_JSON, f"#{position}", str(err))
            continue
        _count_images(report, record)
        try:
            sample = builder.build(record, position, header_only=True)
        except RecordError as err:
            report.problems.add(err.kind, err.record_id, str(err))
            continue
        for note in sample.conversation.notes:
            report.notes.add(note, sample.record_id)
        lengths.append(len(sample.encoded))
        if sample.encoded.truncated:
            report.truncations.add(Problem.TRUNCATED, sample.record_id)
        if not sample.trainable:
            report.problems.add(Problem.FULLY_MASKED, sample.record_id,
                                f"record {sample.record_id!r} has no supervised token after "
                                "tokenization/truncation; it would be dropped from training")
    report.lengths.append(np.asarray(lengths, dtype=np.int32))
    return report


def _count_images(report: Report, record: Any) -> None:
    if not has_image(record):
        report.text_only += 1
        return
    report.image_records += 1
    image = image_field(record)
    if isinstance(image, list) and len(image) > 1:
        report.multi_image += 1

"""The counts of one scan of records (`scan`): what `inspect-data --check` prints and the
checks before training judge, merged across the scan's worker processes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_cli.data.problems import ProblemCounter

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
    lengths: list[np.ndarray] = field(default_factory=list)  # (position, tokens) rows
    problems: ProblemCounter = field(default_factory=_counter)  # errors and fully-masked
    notes: ProblemCounter = field(default_factory=_counter)  # harmless fixes
    truncations: ProblemCounter = field(default_factory=_counter)
    warnings: ProblemCounter = field(default_factory=_counter)  # worth a look, not failing
    # (hash of the id, position) of each record that has an id, for `count_duplicate_ids`:
    # 16 bytes a record crosses from the workers, not the ids' text.
    ids: list[np.ndarray] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        """Records cut to model_max_length."""
        return self.truncations.total

    def merge(self, other: Report) -> None:
        """Add another worker's counts into this one."""
        for name in ("records", "image_records", "text_only", "multi_image"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.lengths += other.lengths
        self.ids += other.ids
        for name in ("problems", "notes", "truncations", "warnings"):
            getattr(self, name).merge(getattr(other, name))

    def repeated(self, copies: int) -> Report:
        """This report of one record counted as `copies` positions (a mix's repeats show the
        record that often; its examples and messages once)."""
        for name in ("records", "image_records", "text_only", "multi_image"):
            setattr(self, name, getattr(self, name) * copies)
        for name in ("problems", "notes", "truncations", "warnings"):
            counter = getattr(self, name)
            for kind in counter.counts:
                counter.counts[kind] *= copies
        return self

    @property
    def failed(self) -> bool:
        """True when any record would fail or train on nothing (or there is no record)."""
        return self.problems.total > 0

    def token_lengths(self, records: int) -> np.ndarray:
        """Each record's tokens (images by theirs) by position; 0 where none was built."""
        out = np.zeros(records, dtype=np.int64)
        for pairs in self.lengths:
            out[pairs[:, 0]] = pairs[:, 1]
        return out

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report (`--format json`)."""
        lengths = np.concatenate([pairs[:, 1] for pairs in self.lengths] or [np.zeros(0)])
        percentiles = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)} \
            if len(lengths) else {}
        if len(lengths):
            percentiles["max"] = int(lengths.max())
        examples = {**self.problems.examples, **self.notes.examples,
                    **self.truncations.examples, **self.warnings.examples}
        return {
            "records": self.records, "image_records": self.image_records,
            "text_only_records": self.text_only, "multi_image_records": self.multi_image,
            "length_tokens": percentiles, "truncated": self.truncated,
            "problems": dict(self.problems.counts), "notes": dict(self.notes.counts),
            "warnings": dict(self.warnings.counts), "examples": examples,
            "first_messages": dict(self.problems.messages),
            "warning_messages": dict(self.warnings.messages), "ok": not self.failed,
        }

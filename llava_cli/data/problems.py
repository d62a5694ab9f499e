"""What can be wrong with a record, in one vocabulary, and the one counter of such problems.

The dataset (records dropped during training), `inspect-data --check`, the held-out pre-check
and the trainer's end-of-run total all count with `ProblemCounter` under these kinds, so a
kind means the same thing in every report.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

# How deep the data checks (pre-training, held-out, `inspect-data --check`) look for image
# problems: fast = header, Pillow's pixel limit and the file's end; full = decode every file.
ImageCheck = Literal["fast", "full"]


class Problem:
    """The kinds of problem a record can have (the strings are the report's keys)."""

    BAD_JSON = "bad-json"  # the record is not valid JSON
    BAD_FIELD = "bad-field"  # a field is missing or of the wrong type
    ROLE_ERROR = "role-error"  # turns that are not human/gpt alternating
    NEEDS_IMAGE = "needs-image"  # the template needs an image and the record has none
    IMAGE_TOKEN_MISMATCH = "image-token-mismatch"  # <image> placeholders vs images
    BAD_IMAGE = "bad-image"  # an image file is missing, cannot be decoded or is too large
    IMAGE_OUTSIDE_FOLDER = "image-outside-folder"  # '../' or absolute, and that is not allowed
    NO_RECORDS = "no-records"  # the whole file: it holds no record at all
    FULLY_MASKED = "fully-masked"  # no supervised token left: trains on nothing, dropped
    TRUNCATED = "truncated"  # cut to model_max_length (a note, not an error)
    # Warnings: `--check` reports them, nothing fails on them.
    EMPTY_REPLY = "empty-reply"  # a gpt turn with no text: it teaches answering nothing
    DUPLICATE_ID = "duplicate-id"  # a record with the id of an earlier one
    HUGE_IMAGE = "huge-image"  # under Pillow's limit, yet slow to decode every epoch
    SAME_REPLIES = "same-replies"  # a preference pair whose two replies are one text

    ERRORS = (BAD_JSON, BAD_FIELD, ROLE_ERROR, NEEDS_IMAGE, IMAGE_TOKEN_MISMATCH, BAD_IMAGE,
              IMAGE_OUTSIDE_FOLDER, NO_RECORDS)
    WARNINGS = (EMPTY_REPLY, DUPLICATE_ID, HUGE_IMAGE, SAME_REPLIES)


class Dropped(NamedTuple):
    """One record left out of training: where it is in the file, why, and its id."""

    position: int
    kind: str
    record_id: str


@dataclass
class ProblemCounter:
    """How many records had each kind of problem, with the first few record ids of each kind
    and the first message of each.

    A dataset's counter counts the drops of its own process (each DataLoader worker has a
    forked copy); the run's total over workers and ranks comes from the `Dropped` lists that
    items carry (`ProblemCounter.of_distinct`). `llava inspect-data --check` lists them all.
    """

    max_examples: int = 3
    distinct_examples: bool = False  # one example per record id (a report), not per drop
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)  # the first message of each kind

    def add(self, kind: str, record_id: str, message: str | None = None) -> None:
        """Count one record with a problem of `kind`."""
        self.counts[kind] += 1
        self.remember(kind, record_id, message)

    def remember(self, kind: str, record_id: str, message: str | None = None) -> None:
        """Keep `record_id` (and `message`) as an example of `kind` without counting it."""
        ids = self.examples.setdefault(kind, [])
        if len(ids) < self.max_examples and not (self.distinct_examples and record_id in ids):
            ids.append(record_id)
        if message and kind not in self.messages:
            self.messages[kind] = message

    def merge(self, other: ProblemCounter) -> None:
        """Add another counter (another worker's) into this one."""
        self.counts.update(other.counts)
        for kind, ids in other.examples.items():
            for record_id in ids:
                self.remember(kind, record_id)
        for kind, message in other.messages.items():
            self.messages.setdefault(kind, message)

    @property
    def total(self) -> int:
        """Records counted, of every kind."""
        return sum(self.counts.values())

    def summary(self, kinds: Iterable[str] | None = None) -> str:
        """One line per kind (of `kinds`, default all): `kind: n (e.g. id1, id2)`."""
        chosen = None if kinds is None else set(kinds)
        return "; ".join(f"{kind}: {n} (e.g. {', '.join(self.examples.get(kind, []))})"
                         for kind, n in self.counts.most_common()
                         if chosen is None or kind in chosen)

    @classmethod
    def of_distinct(cls, drops: Iterable[Dropped]) -> ProblemCounter:
        """Counts of distinct records (by position): a record dropped in every epoch, or by
        several workers, counts once."""
        counter = cls()
        for drop in sorted({d.position: d for d in drops}.values()):
            counter.add(drop.kind, drop.record_id)
        return counter

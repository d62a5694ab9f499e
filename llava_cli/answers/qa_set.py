"""A QA file read and checked whole, answered in batches and scored: the one path of
`llava evaluate` and of training's evaluation (`--eval-generate`), so both give the same
answers and the same accuracy for the same model.

Every record is read and checked before any model is needed (`read_qa_set`): its fields, and
every image resolved by the one path rule (`data.image_paths`: the image folder given, else
the QA file's folder), kept inside that folder unless allowed, a regular file that opens as an
image. So bad input fails in a second, naming the record and the field, not at the 13th
answer or after a training run's steps. Answers come `batch_size` records per
generate call (`answer_questions`), left-padded: the same answers as one at a time.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llava_cli.answers.generator import DEFAULT_MAX_NEW_TOKENS, Generator
from llava_cli.answers.qa import (
    QARecord,
    check_group_field,
    check_metric,
    read_qa_record,
    record_place,
)
from llava_cli.answers.scoring import Tally, score_answer

DEFAULT_GROUP = "question_type"
DEFAULT_BATCH_SIZE = 8
ALLOW_OUTSIDE = "--allow-images-outside-folder"  # how `generate`/`evaluate` allow such paths


@dataclass(frozen=True)
class QASet:
    """The checked records of a QA file, the field they are grouped by and their images'
    folder."""

    records: list[QARecord]
    group_by: str | None
    image_folder: Path
    source: str

    def __len__(self) -> int:
        return len(self.records)


def read_qa_set(data: str | Path, image_folder: str | Path | None = None,
                metric: str | None = None, group_by: str | None = None, *,
                allow_outside: bool = False, allow_hint: str = ALLOW_OUTSIDE,
                need_reference: bool = True, check_images: bool = True) -> QASet:
    """Every record of `data` as a `QARecord` (ValueError naming the first bad one), the field
    grouped by (an explicit `group_by` no record has is refused; by default `question_type`,
    when any record has it) and the image folder (`data.image_paths.image_root`: the one given,
    else the data file's folder). Each record's images are absolute paths, confined to that
    folder unless `allow_outside` (`allow_hint`: how the user allows it) and, unless
    `check_images` is False, checked (`data.images.check_image`: a regular image file)."""
    from llava_cli.data.image_paths import image_root
    from llava_cli.data.records import RecordIndex

    check_metric(metric)
    if image_folder is not None and not Path(image_folder).expanduser().is_dir():
        raise ValueError(f"image folder {str(image_folder)!r} is not a folder; give the folder "
                         "the records' image paths start from (default: the data file's)")
    index = RecordIndex.open(data)
    raw = [index.read(i) for i in range(len(index))]
    if not raw:
        raise ValueError(f"{data}: no records to evaluate")
    if group_by is not None:
        check_group_field(raw, group_by, str(data))
    elif any(isinstance(r, dict) and DEFAULT_GROUP in r for r in raw):
        group_by = DEFAULT_GROUP
    root = image_root(image_folder, data)
    images = _ImageCheck(root, allow_outside, allow_hint, check_images)
    records = []
    for i, one in enumerate(raw):
        record = read_qa_record(one, i, str(data), metric, group_by, need_reference)
        where = record_place(record.record_id, i, str(data))
        records.append(replace(record, images=[images.path(p, where) for p in record.images]))
    return QASet(records, group_by, Path(root), str(data))


class _ImageCheck:
    """A QA file's image paths resolved, confined and checked, each file once."""

    def __init__(self, root: str, allow_outside: bool, allow_hint: str, check: bool) -> None:
        self.root, self.allow_outside, self.allow_hint, self.check = \
            root, allow_outside, allow_hint, check
        self.seen: set[str] = set()

    def path(self, relative: str, where: str) -> str:
        """The absolute path of `relative`, or ValueError naming `where` and the field."""
        from llava_cli.data.image_paths import ImageOutsideFolder, confine
        from llava_cli.data.images import ImageError, check_image

        try:
            path = confine(self.root, relative, self.allow_outside)
            if self.check and path not in self.seen:
                check_image(path, label=relative)
                self.seen.add(path)
        except ImageOutsideFolder as err:
            raise ValueError(f"{where}: `image`: {err}; allow such paths with "
                             f"{self.allow_hint}") from None
        except ImageError as err:
            raise ValueError(f"{where}: `image`: {err}") from None
        return path


def answer_questions(generator: Generator, records: Sequence[QARecord], image_folder: Path,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     advance: Callable[[int], None] | None = None) -> Iterator[str]:
    """The greedy answer to each record, in order, `batch_size` records per generate call;
    `advance(n)` is told after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size}: give 1 or more")
    images = _ImageCache(generator, image_folder, 2 * batch_size)
    for start in range(0, len(records), batch_size):
        batch = records[start:start + batch_size]
        asks = [(images.get(record.images), record.question) for record in batch]
        yield from generator.answer_batch(asks, max_new_tokens)
        if advance is not None:
            advance(len(batch))


def score_record(record: QARecord, reply: str, official_vqa: bool = True) -> float:
    """The score in [0, 1] of `reply` to `record`, by the record's metric."""
    return score_answer(reply, record.references, record.metric, record.options, official_vqa)


def tally_answers(records: Sequence[QARecord], replies: Sequence[str],
                  official_vqa: bool = True) -> Tally:
    """The scores of `replies` (one per record, in order), overall and per group."""
    tally = Tally()
    for record, reply in zip(records, replies, strict=True):
        tally.add(score_record(record, reply, official_vqa), record.group)
    return tally


def accuracy_metrics(tally: Tally, prefix: str = "eval") -> dict[str, float]:
    """`<prefix>_accuracy` and one `<prefix>_accuracy_<group>` per group (its name with each
    run of characters other than letters, digits and `_` made one `_`: a metric name)."""
    metrics = {f"{prefix}_accuracy": tally.accuracy()}
    for group, row in tally.group_accuracy().items():
        metrics[f"{prefix}_accuracy_{re.sub(r'[^0-9A-Za-z_]+', '_', group)}"] = \
            float(row["accuracy"])
    return metrics


class _ImageCache:
    """Decoded images kept for the next records: QA sets ask several questions about a
    picture in a row (VQA, MMBench's circular copies), and decoding it once is enough. At most
    `size` images are kept, the least recently used go first."""

    def __init__(self, generator: Generator, folder: Path, size: int) -> None:
        self.generator, self.folder, self.size = generator, folder, size
        self.kept: OrderedDict[str, Any] = OrderedDict()

    def get(self, paths: list[str]) -> list[Any]:
        """The decoded images of `paths` (relative to the image folder)."""
        return [self._one(path) for path in paths]

    def _one(self, path: str) -> Any:
        from llava_cli.data.images import resolve_image_path

        if path in self.kept:
            self.kept.move_to_end(path)
            return self.kept[path]
        image = self.generator.images.decode(resolve_image_path(self.folder, path), label=path)
        self.kept[path] = image
        if len(self.kept) > self.size:
            self.kept.popitem(last=False)
        return image

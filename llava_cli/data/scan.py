"""One pass over records as training would read them, counted into a `Report`, on one core
(`scan_records`) or on all of them (`check_dataset`).

Used by `inspect-data --check`, and by training before its model loads (training records) and
before its first step (held-out records). Images get the fast check (`images.check_image`:
header, Pillow's pixel limit, the file's end), which is what makes a full scan of a
665k-record file take minutes, not hours; `image_check: full` decodes them all.

In parallel, the sample builder is made once, before forking: each worker process inherits it
and the record index (fork passes a process's arguments without pickling them), takes slices
of the index from a queue, and sends back one small `Report` per slice.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import queue
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llava_cli.data.conversation import RecordError, has_image, image_field
from llava_cli.data.preference_pairs import PairSample, looks_like_preference
from llava_cli.data.problems import Problem
from llava_cli.data.records import RecordFormatError
from llava_cli.data.report import EXAMPLES_PER_KIND, Report
from llava_cli.data.samples import Sample, SampleBuilder
from llava_cli.data.sources.mix import Distinct, MixIndex, Records

# Above this an image is a warning: decoded in RGB it takes 192 MB, and every epoch decodes it
# again (about half a second a worker) for a tower that sees a few hundred pixels.
HUGE_IMAGE_PIXELS = 64_000_000


def scan_records(builder: SampleBuilder, index: Records, start: int, stop: int,
                 distinct: Distinct | None = None) -> Report:
    """Scan records [start, stop) of `index` into a `Report`; an index without records is a
    `no-records` problem. With `distinct` (a mix that repeats records), [start, stop) numbers
    its distinct records: each is read once and counted once per position that shows it."""
    report = Report()
    if len(index) == 0:
        report.problems.add(Problem.NO_RECORDS, os.path.basename(index.path),
                            f"{index.path} holds no records: there is nothing to train on")
    lengths: list[tuple[int, int]] = []
    ids: list[tuple[int, int]] = []
    for n in range(start, stop):
        if distinct is None:
            _scan_one(report, builder, index, n, lengths, ids)
            continue
        position, copies = int(distinct.firsts[n]), int(distinct.copies[n])
        one = Report() if copies > 1 else report
        _scan_one(one, builder, index, position, lengths, ids)
        if copies > 1:
            report.merge(one.repeated(copies))
    report.lengths.append(np.asarray(lengths, dtype=np.int64).reshape(-1, 2))
    report.ids.append(np.asarray(ids, dtype=np.int64).reshape(-1, 2))
    return report


def _scan_one(report: Report, builder: SampleBuilder, index: Records, position: int,
              lengths: list[tuple[int, int]], ids: list[tuple[int, int]]) -> None:
    report.records += 1
    try:
        record = index.read(position)
    except RecordFormatError as err:
        report.problems.add(Problem.BAD_JSON, index.origin(position), str(err))
        return
    _count_images(report, record)
    if isinstance(record, dict) and record.get("id") not in (None, ""):
        ids.append((_id_hash(str(record["id"])), position))
    try:
        sample = builder.build(record, position, header_only=True)
    except RecordError as err:
        report.problems.add(err.kind, err.record_id, str(err))
        return
    for note in sample.conversation.notes:
        report.notes.add(note, sample.record_id)
    lengths.append((position, len(sample.encoded)))
    if sample.encoded.truncated:
        report.truncations.add(Problem.TRUNCATED, sample.record_id)
    if not sample.trainable:
        report.problems.add(Problem.FULLY_MASKED, sample.record_id,
                            f"record {sample.record_id!r} has no supervised token after "
                            "tokenization/truncation; it would be dropped from training")
    _warn(report, sample)


def _warn(report: Report, sample: Sample | PairSample) -> None:
    """The warnings of a usable record: an empty reply, an image over HUGE_IMAGE_PIXELS; of a
    preference pair also an empty rejected reply and two replies of the same text."""
    rid = sample.record_id
    sides = [sample.chosen, sample.rejected] if isinstance(sample, PairSample) else [sample]
    if any(m.role == "assistant" and not m.content.strip()
           for side in sides for m in side.conversation.messages):
        report.warnings.add(Problem.EMPTY_REPLY, rid, f"record {rid!r} has an empty gpt reply: "
                            "training on it teaches the model to answer nothing")
    if isinstance(sample, PairSample) and _reply(sample.chosen) == _reply(sample.rejected):
        report.warnings.add(Problem.SAME_REPLIES, rid, f"record {rid!r} has the same chosen "
                            "and rejected reply: the pair teaches nothing (its DPO gradient "
                            "is zero); fix or remove it")
    for width, height in sample.image_sizes:
        if width * height > HUGE_IMAGE_PIXELS:
            report.warnings.add(
                Problem.HUGE_IMAGE, rid, f"record {rid!r} has a {width}×{height} image "
                f"({width * height / 1e6:.0f} megapixels, over {HUGE_IMAGE_PIXELS // 10**6}): "
                "every epoch decodes it in full; shrink such images once, beforehand")
            return


def _reply(sample: Sample) -> str:
    """A pair side's last reply, as the model is taught it."""
    return sample.conversation.messages[-1].content.strip()


def _id_hash(record_id: str) -> int:
    """A 64-bit hash of an id, the same in every process (`hash` of a str is salted)."""
    digest = hashlib.blake2b(record_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def count_duplicate_ids(report: Report, index: Records) -> None:
    """Warn about records whose id an earlier record already has: counted from the hashes,
    named by reading the first few of them back from `index`."""
    pairs = np.concatenate(report.ids) if report.ids else np.zeros((0, 2), np.int64)
    hashes, first, counts = np.unique(pairs[:, 0], return_index=True, return_counts=True)
    shared = np.flatnonzero(counts > 1)
    if not len(shared):
        return
    report.warnings.counts[Problem.DUPLICATE_ID] += int((counts[shared] - 1).sum())
    for hashed in hashes[shared[np.argsort(first[shared])][:EXAMPLES_PER_KIND]]:
        positions = pairs[pairs[:, 0] == hashed, 1]
        record_id = str(index.read(int(positions[0]))["id"])
        listed = positions[:EXAMPLES_PER_KIND]
        shown = ", ".join(f"#{p}" for p in listed) + (", …" if len(positions) > len(listed) else "")
        report.warnings.remember(Problem.DUPLICATE_ID, record_id, f"id {record_id!r} is used "
                                 f"by {len(positions)} records ({shown})")


def _count_images(report: Report, record: Any) -> None:
    if not has_image(record) and not _rlaif_image(record):
        report.text_only += 1
        return
    report.image_records += 1
    image = image_field(record)
    if isinstance(image, list) and len(image) > 1:
        report.multi_image += 1


def _rlaif_image(record: Any) -> bool:
    """Whether a preference record shows its image by RLAIF-V's `image_path` alone (the pair
    reads it as its image: `data.preference_pairs.preference_records`)."""
    return (isinstance(record, dict) and looks_like_preference(record)
            and "image" not in record and "images" not in record
            and bool(record.get("image_path")))


RESULT_WAIT_SECONDS = 1.0  # how often the parent looks whether a worker died


def check_dataset(make_builder: Callable[[], SampleBuilder], index: Records,
                  workers: int | None = None, on_progress: Callable[[int], None] | None = None,
                  slice_size: int = 2000) -> Report:
    """Scan every record with `workers` processes (default: all cores), merge the reports and
    count the ids that several records share."""
    workers = workers or _usable_cores()
    report = Report()
    builder = make_builder()  # once, before forking: workers start scanning at once
    # A mix's repeats show some records many times: each is scanned once.
    distinct = index.distinct() if isinstance(index, MixIndex) else None
    total = len(index) if distinct is None else len(distinct.firsts)
    # An empty index still gets its one scan: it reports that there is no record.
    slices = list(_slices(total, slice_size)) or [(0, 0)]
    if workers <= 1 or len(slices) <= 1:
        for bounds in slices:
            part = scan_records(builder, index, *bounds, distinct)
            report.merge(part)
            if on_progress:
                on_progress(part.records)
    else:
        parts: dict[int, Report] = {}
        for number, part in _scan_in_processes(builder, index, slices,
                                               min(workers, len(slices)), distinct):
            parts[number] = part
            if on_progress:
                on_progress(part.records)
        for number in sorted(parts):  # in file order: the examples do not depend on timing
            report.merge(parts[number])
    if distinct is not None and report.lengths:
        report.lengths = [distinct.spread(np.concatenate(report.lengths))]
    count_duplicate_ids(report, index)  # ids of distinct records: a repeat is no duplicate
    return report


def _usable_cores() -> int:
    """The cores this process may run on (affinity and container limits), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _slices(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _scan_in_processes(builder: SampleBuilder, index: Records,
                       slices: list[tuple[int, int]], workers: int,
                       distinct: Distinct | None = None) -> Iterator[tuple[int, Report]]:
    """(slice number, report) of `slices`, scanned by `workers` forked processes, as they
    finish."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    tasks: Any = context.Queue()
    results: Any = context.Queue()
    for task in enumerate(slices):
        tasks.put(task)
    for _ in range(workers):
        tasks.put(None)  # one stop sign per worker
    # Slices left unread when the scan stops early must not keep this process from exiting.
    tasks.cancel_join_thread()
    processes = [context.Process(target=_work, args=(builder, index, tasks, results, distinct),
                                 daemon=True) for _ in range(workers)]
    for process in processes:
        process.start()
    try:
        for _ in slices:
            yield _next_result(results, processes)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()


def _work(builder: SampleBuilder, index: Records, tasks: Any, results: Any,
          distinct: Distinct | None) -> None:
    """A worker's loop: scan slices until the stop sign; a failure is sent back, not lost."""
    while (task := tasks.get()) is not None:
        number, bounds = task
        try:
            results.put((number, scan_records(builder, index, *bounds, distinct)))
        except Exception as err:  # noqa: BLE001 - re-raised in the parent
            results.put(_sendable(err))
            return


def _sendable(err: Exception) -> Exception:
    """`err` itself if it survives pickling to the parent, else a ValueError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - any pickling failure
        return ValueError(f"{type(err).__name__}: {err}")
    return err


def _next_result(results: Any, processes: list[Any]) -> tuple[int, Report]:
    while True:
        try:
            item = results.get(timeout=RESULT_WAIT_SECONDS)
        except queue.Empty:
            codes = [p.exitcode for p in processes]
            if not any(code not in (None, 0) for code in codes) and None in codes:
                continue  # still working
            try:  # a worker may have sent its last result just before exiting
                item = results.get(timeout=RESULT_WAIT_SECONDS)
            except queue.Empty:
                raise RuntimeError(f"--check worker processes stopped before the scan was "
                                   f"complete (exit codes {codes})") from None
        if isinstance(item, BaseException):
            raise item
        return item

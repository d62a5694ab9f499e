"""`inspect-data --check`: scan a whole dataset on every core and report what would go wrong.

The sample builder is made once, before forking: each worker process inherits it and the
record index (fork passes a process's arguments without pickling them), takes slices of the
index from a queue, and sends back one small `Report` per slice.
"""

from __future__ import annotations

import os
import pickle
import queue
from collections.abc import Callable, Iterator
from typing import Any

from llava_cli.data.records import RecordIndex
from llava_cli.data.samples import SampleBuilder
from llava_cli.data.scan import Report, scan_records

RESULT_WAIT_SECONDS = 1.0  # how often the parent looks whether a worker died


def check_dataset(make_builder: Callable[[], SampleBuilder], index: RecordIndex,
                  workers: int | None = None, on_progress: Callable[[int], None] | None = None,
                  slice_size: int = 2000) -> Report:
    """Scan every record with `workers` processes (default: all cores) and merge the reports."""
    workers = workers or os.cpu_count() or 1
    report = Report()
    builder = make_builder()  # once, before forking: workers start scanning at once
    slices = list(_slices(len(index), slice_size))
    if workers <= 1 or len(slices) <= 1:
        for bounds in slices:
            report.merge(scan_records(builder, index, *bounds))
            if on_progress:
                on_progress(bounds[1] - bounds[0])
        return report
    parts: dict[int, Report] = {}
    for number, part in _scan_in_processes(builder, index, slices, min(workers, len(slices))):
        parts[number] = part
        if on_progress:
            on_progress(part.records)
    for number in sorted(parts):  # in file order: the examples do not depend on timing
        report.merge(parts[number])
    return report


def _slices(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _scan_in_processes(builder: SampleBuilder, index: RecordIndex,
                       slices: list[tuple[int, int]], workers: int
                       ) -> Iterator[tuple[int, Report]]:
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
    processes = [context.Process(target=_work, args=(builder, index, tasks, results),
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


def _work(builder: SampleBuilder, index: RecordIndex, tasks: Any, results: Any) -> None:
    """A worker's loop: scan slices until the stop sign; a failure is sent back, not lost."""
    while (task := tasks.get()) is not None:
        number, bounds = task
        try:
            results.put((number, scan_records(builder, index, *bounds)))
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

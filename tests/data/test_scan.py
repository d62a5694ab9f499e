"""data.scan: the whole-file scan on several processes, what happens when a worker fails (its
error comes back; a dead worker is an error, never a hang), and what the scan counts beyond
each record: no records at all, ids that several records share, warnings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llava_cli.data.conversation import RecordError
from llava_cli.data.records import RecordIndex
from llava_cli.data.scan import Report, check_dataset, scan_records


@pytest.fixture
def index(tmp_path: Path) -> RecordIndex:
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "gpt", "value": "yo"}]}
               for i in range(9)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return RecordIndex.open(path, cache_dir=tmp_path / "cache")


class RaisingBuilder:
    """Fails on one record the way an unexpected bug would (not a RecordError)."""

    def build(self, record, position, header_only=False):
        raise KeyError(f"boom at {position}")


class DyingBuilder:
    """Takes its process down, as the OOM killer would."""

    def build(self, record, position, header_only=False):
        os._exit(3)


def test_an_error_in_a_worker_is_raised_in_the_parent(index):
    with pytest.raises(KeyError, match="boom at"):
        check_dataset(RaisingBuilder, index, workers=2, slice_size=2)


def test_a_dead_worker_is_an_error_not_a_hang(index):
    with pytest.raises(RuntimeError, match=r"worker processes stopped.*3"):
        check_dataset(DyingBuilder, index, workers=2, slice_size=2)


class RefusingBuilder:
    """Every record has a structural problem (what a real builder raises)."""

    def build(self, record, position, header_only=False):
        raise RecordError(record.get("id", f"#{position}"), "role-error", "no exchange")


def _index(tmp_path: Path, records: list) -> RecordIndex:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    return RecordIndex.open(path, cache_dir=tmp_path / "cache")


def test_an_empty_file_is_a_no_records_problem(tmp_path):
    index = _index(tmp_path, [])
    for report in (check_dataset(RaisingBuilder, index, workers=2),  # the builder is not used
                   scan_records(RaisingBuilder(), index, 0, 0)):  # the held-out pre-check
        assert report.failed and report.records == 0
        assert dict(report.problems.counts) == {"no-records": 1}
        assert report.problems.messages["no-records"] == (
            f"{index.path} holds no records: there is nothing to train on")


@pytest.mark.parametrize("workers", [1, 2])
def test_duplicate_ids_are_counted_across_slices_and_named(tmp_path, workers):
    ids = ["a", "b", "a", 7, "c", "7", "a", None, "", "b"]
    index = _index(tmp_path, [{"id": rid} if rid is not None else {} for rid in ids])
    report = check_dataset(RefusingBuilder, index, workers=workers, slice_size=3)
    # A record without an id (or with "") shares none; 7 and "7" are one id, as in messages.
    assert report.warnings.counts["duplicate-id"] == 4  # a twice more, then 7 and b once
    assert report.warnings.examples["duplicate-id"] == ["a", "b", "7"]  # by first occurrence
    assert report.warnings.messages["duplicate-id"] == "id 'a' is used by 3 records (#0, #2, #6)"
    assert not report.warnings.counts.keys() - {"duplicate-id"}
    assert report.to_dict()["warnings"] == {"duplicate-id": 4}
    assert report.to_dict()["ok"] is False  # the role errors, not the warnings


def test_warnings_do_not_fail_a_report():
    report = Report()
    report.warnings.add("empty-reply", "r1", "record 'r1' has an empty gpt reply")
    other = Report()
    other.warnings.add("empty-reply", "r2")
    report.merge(other)
    result = report.to_dict()
    assert result["ok"] is True and not report.failed
    assert result["warnings"] == {"empty-reply": 2}
    assert result["examples"]["empty-reply"] == ["r1", "r2"]
    assert result["warning_messages"] == {"empty-reply": "record 'r1' has an empty gpt reply"}

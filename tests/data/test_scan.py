"""data.scan: the whole-file scan on several processes, and what happens when a worker
fails (its error comes back; a dead worker is an error, never a hang)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llava_cli.data.records import RecordIndex
from llava_cli.data.scan import check_dataset


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

"""Mix files and MixIndex over real JSON/JSONL files: exact records, seeded selection,
repeat < 1 and weights, mid-epoch resume order, InternVL's meta layout, and the one-line
errors of bad mix files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from llava_cli.data.records import RecordIndex
from llava_cli.data.sources.mix import MixIndex, open_records
from llava_cli.data.sources.mixfile import MixError, read_mix
from llava_cli.data.sources.record import SourceRecord
from tests.data.mixdata import records, write_json, write_jsonl


def _mix(tmp_path: Path, sources: list[dict], **top) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, **top}))
    return path


@pytest.fixture
def two(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "a.jsonl", records("a", 10))
    write_json(tmp_path / "b.json", records("b", 4))
    return tmp_path


def _ids(index) -> list[str]:
    return [index.read(i)["id"] for i in range(len(index))]


def test_plain_file_stays_a_record_index(two: Path) -> None:
    assert isinstance(open_records(two / "a.jsonl"), RecordIndex)


def test_mix_reads_every_source_exactly(two: Path) -> None:
    index = open_records(_mix(two, [{"path": "a.jsonl"}, {"path": "b.json", "repeat": 2}]))
    assert isinstance(index, MixIndex) and len(index) == 10 + 8
    assert _ids(index) == [f"a-{k}" for k in range(10)] + [f"b-{k}" for k in range(4)] * 2
    record = index.read(11)
    assert isinstance(record, SourceRecord) and record.origin == "#1#1"
    assert record == records("b", 4)[1]  # the record itself, unchanged
    assert index.has_image.tolist() == [False] * 18
    assert (np.abs(index.modality_lengths()) == index.text_bytes).all()
    assert index.read(-1)["id"] == "b-3"
    with pytest.raises(IndexError):
        index.read(18)


def test_repeat_below_one_is_a_seeded_subsample(two: Path) -> None:
    mix = _mix(two, [{"name": "a", "path": "a.jsonl", "repeat": 0.5}, {"path": "b.json"}])
    first, again = _ids(open_records(mix)), _ids(open_records(mix))
    assert first == again and len(first) == 5 + 4
    picked = first[:5]
    assert len(set(picked)) == 5 and all(i.startswith("a-") for i in picked)
    assert picked == sorted(picked, key=lambda s: int(s.split("-")[1]))  # file order
    # 1.5 = one whole copy and the same seeded half again.
    one_and_half = _ids(open_records(_mix(two, [{"path": "a.jsonl", "repeat": 1.5}])))
    assert one_and_half[:10] == [f"a-{k}" for k in range(10)] and one_and_half[10:] == picked
    other_seed = _ids(open_records(_mix(two, [{"path": "a.jsonl", "repeat": 0.5}], seed=7)))
    assert other_seed != picked and len(other_seed) == 5


def test_weights_set_each_sources_share(two: Path) -> None:
    index = open_records(_mix(two, [{"path": "a.jsonl", "weight": 1},
                                    {"path": "b.json", "weight": 1}]))
    ids = _ids(index)
    # 14 records in all, half from each: a subsampled to 7, b repeated 1.75 times.
    assert len(ids) == 14
    assert sum(i.startswith("a-") for i in ids) == 7 and sum(i.startswith("b-") for i in ids) == 7
    assert ids[7:11] == [f"b-{k}" for k in range(4)]


def test_internvl_meta_layout(two: Path) -> None:
    (two / "images").mkdir()
    meta = {"first": {"root": "images", "annotation": "a.jsonl", "repeat_time": 0.3,
                      "data_augment": False, "max_dynamic_patch": 6, "length": 10},
            "second": {"root": "images", "annotation": "b.json", "repeat_time": 1}}
    (two / "meta.json").write_text(json.dumps(meta))
    index = open_records(two / "meta.json")
    assert len(index) == 3 + 4
    record = index.read(0)
    assert record.image_folder == str(two / "images") and record.origin.startswith("first#")
    spec = read_mix(two / "meta.json")
    assert [s.name for s in spec.sources] == ["first", "second"]


def test_pickled_index_reads_the_same(two: Path) -> None:
    index = open_records(_mix(two, [{"path": "a.jsonl", "repeat": 0.5}, {"path": "b.json"}]))
    index.read(0)  # opens a file handle: it must not travel
    copy = pickle.loads(pickle.dumps(index))
    assert _ids(copy) == _ids(index)
    assert pickle.loads(pickle.dumps(index.read(2))).origin == index.read(2).origin


def test_resumed_order_equals_the_uninterrupted_one(two: Path) -> None:
    """The Trainer's sampler draws positions from its own seeded generator and skips the
    batches already seen on resume: the mix has to give the same record at the same position
    in a fresh process, which a reopened (and re-pickled) index shows."""
    mix = _mix(two, [{"path": "a.jsonl", "repeat": 0.7}, {"path": "b.json", "repeat": 2.5}])
    order = torch.randperm(len(open_records(mix)), generator=torch.Generator().manual_seed(3))
    full = [open_records(mix).read(int(i))["id"] for i in order]
    seen = 5
    resumed = pickle.loads(pickle.dumps(open_records(mix)))
    again = torch.randperm(len(resumed), generator=torch.Generator().manual_seed(3))
    assert [resumed.read(int(i))["id"] for i in again[seen:]] == full[seen:]


@pytest.mark.parametrize(("entry", "message"), [
    ({"path": "nope.jsonl"}, "source '#0': path 'nope.jsonl' not found"),
    ({"path": "a.jsonl", "repeat": 0}, "source '#0': repeat 0 would drop the source"),
    ({"path": "a.jsonl", "repeat": "twice"}, "source '#0': repeat must be a number > 0"),
    ({"path": "a.jsonl", "weight": -1}, "source '#0': weight must be a number > 0"),
    ({"path": "a.jsonl", "repeats": 2}, "source '#0': unknown key 'repeats'"),
    ({"path": "a.jsonl", "repeat": 1, "weight": 1}, "give 'repeat' or 'weight', not both"),
    ({"name": "x", "path": "a.jsonl", "image_folder": "none"},
     "source 'x': image_folder 'none' is not a folder"),
    ({"repeat": 2}, "source '#0': 'path' must name a data file or folder"),
])
def test_bad_mix_entries_are_one_line_errors(two: Path, entry: dict, message: str) -> None:
    with pytest.raises(MixError) as info:
        open_records(_mix(two, [entry]))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_mix_files(two: Path) -> None:
    (two / "top.yaml").write_text("sources: [{path: a.jsonl}]\nshuffle: true\n")
    with pytest.raises(MixError, match="unknown key 'shuffle'"):
        open_records(two / "top.yaml")
    (two / "mixed.yaml").write_text("sources: [{path: a.jsonl, weight: 1}, {path: b.json}]\n")
    with pytest.raises(MixError, match="source '#1' has no 'weight'"):
        open_records(two / "mixed.yaml")
    (two / "nested.yaml").write_text("sources: [{path: top.yaml}]\n")
    with pytest.raises(MixError, match="is itself a mix file"):
        open_records(two / "nested.yaml")
    (two / "meta.json").write_text(json.dumps({"s": {"annotation": "a.jsonl", "rot": "x"}}))
    with pytest.raises(MixError, match="source 's': unknown key 'rot'"):
        open_records(two / "meta.json")
    (two / "empty.yaml").write_text("sources: []\n")
    with pytest.raises(MixError, match="non-empty list"):
        open_records(two / "empty.yaml")


def test_a_file_named_twice_is_indexed_once(two: Path) -> None:
    (two / "images").mkdir()
    index = open_records(_mix(two, [{"path": "a.jsonl"},
                                    {"path": "a.jsonl", "image_folder": "images"}]))
    assert index.sources[0] is index.sources[1] and len(index) == 20
    assert index.read(0).image_folder is None
    assert index.read(10).image_folder == str(two / "images")

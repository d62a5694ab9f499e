"""Mix amounts are bounded and each record is scanned once: a huge repeat or weight is named
before anything is indexed, a repeat or weight of 0 says that it drops the source, and a
repeated source is read once per record (its counts and lengths per position, as training
sees them) with a duplicate id warned once per source record, not once per repeat."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
from llava_cli.data.scan import check_dataset, scan_records
from llava_cli.data.sources.mix import MixIndex, open_records
from llava_cli.data.sources.mixfile import MixError
from tests.data.mixdata import png_bytes, records, turns, write_jsonl
from tests.helpers import llama_tokenizer_as_trained


@pytest.fixture(scope="module")
def builder(assets) -> SampleBuilder:
    return SampleBuilder(DataOptions(model_max_length=256),
                         InputSpec(llama_tokenizer_as_trained(assets), 32000, lambda size: 4,
                                   (0.5,) * 3))


def _mix(tmp_path: Path, *sources: dict) -> Path:
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": list(sources)}))
    return mix


@pytest.mark.parametrize(("field", "value", "message"), [
    ("repeat", 1e20, "repeat 1e+20 is above the limit of 1e+09; give a smaller repeat (how "
     "often the source's records are used; below 1 takes a seeded subsample)"),
    ("weight", 1e300, "weight 1e+300 is above the limit of 1e+09; give a smaller weight (a "
     "source's share of the mix, relative to the other sources' weights)"),
    ("repeat", 0, "repeat 0 would drop the source; remove it from the mix instead (repeat is "
     "how often the source's records are used; below 1 takes a seeded subsample)"),
    ("weight", 0, "weight 0 would drop the source; remove it from the mix instead (weight is "
     "a source's share of the mix, relative to the other sources' weights)"),
    ("weight", -1, "weight must be a number > 0 (a source's share of the mix, relative to "
     "the other sources' weights), got -1"),
])
def test_amounts_out_of_range_are_named(tmp_path: Path, field, value, message) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("a", 6))
    mix = _mix(tmp_path, {"name": "six", "path": "a.jsonl", field: value})
    with pytest.raises(MixError) as err:
        open_records(mix)
    assert str(err.value) == f"{mix}: source 'six': {message}"


def test_a_mix_over_the_position_limit_is_named(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("a", 6))
    mix = _mix(tmp_path, {"name": "first", "path": "a.jsonl", "repeat": 1e8},
               {"name": "big", "path": "a.jsonl", "repeat": 1.5e8})
    with pytest.raises(MixError) as err:
        open_records(mix)
    assert str(err.value) == (
        f"{mix}: source 'big' makes the mix 1,500,000,000 positions (6 records x repeat "
        "1.5e+08), above the limit of 1,000,000,000; lower its repeat or weight")


class _Counting:
    """A source that counts its reads."""

    def __init__(self, source) -> None:
        self.source, self.reads = source, 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i):
        self.reads += 1
        return self.source.read(i)


def test_a_huge_repeat_reads_each_record_once(tmp_path: Path, builder) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("a", 6))
    index = open_records(_mix(tmp_path, {"name": "six", "path": "a.jsonl",
                                         "repeat": 1_000_000}))
    assert isinstance(index, MixIndex)
    index.sources[0] = counting = _Counting(index.sources[0])
    report = check_dataset(lambda: builder, index, workers=1)
    assert counting.reads == 6
    assert (report.records, report.text_only) == (6_000_000, 6_000_000)
    assert dict(report.warnings.counts) == {}  # a repeat is the same record, not a duplicate
    lengths = report.token_lengths(len(index))
    one_copy = [len(builder.build(index.read(k)).encoded) for k in range(6)]
    assert lengths.shape == (6_000_000,) and (lengths.reshape(-1, 6) == one_copy).all()


def _two_sources(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(png_bytes())
    rows = records("a", 4, image="ok.png")
    rows[1]["image"] = "missing.png"  # a bad record: counted per position that shows it
    rows[3]["id"] = "a-0"  # a duplicate id within the source
    write_jsonl(tmp_path / "a.jsonl", rows)
    write_jsonl(tmp_path / "b.jsonl", [{"id": f"b-{k}", "conversations": turns("q", "a" * k)}
                                       for k in range(1, 6)])
    return _mix(tmp_path, {"name": "a", "path": "a.jsonl", "image_folder": "images",
                           "repeat": 2.5},
                {"name": "b", "path": "b.jsonl", "repeat": 0.6})


@pytest.mark.parametrize("workers", [1, 2])
def test_a_distinct_scan_counts_as_a_scan_of_every_position(tmp_path: Path, builder,
                                                             workers: int) -> None:
    index = open_records(_two_sources(tmp_path))
    assert len(index) == 10 + 3
    once = check_dataset(lambda: builder, index, workers=workers, slice_size=2)
    every = scan_records(builder, index, 0, len(index))  # each position read, as before
    for name in ("records", "image_records", "text_only", "multi_image"):
        assert getattr(once, name) == getattr(every, name), name
    assert once.problems.counts == every.problems.counts
    shown = sum(index.locate(i) == (0, 1) for i in range(len(index)))  # a-1's positions
    assert shown >= 2 and dict(once.problems.counts) == {"bad-image": shown}
    assert (once.token_lengths(len(index)) == every.token_lengths(len(index))).all()
    # a-0 and a-3 share an id: one duplicate, however often the repeats show them
    assert dict(once.warnings.counts) == {"duplicate-id": 1}
    assert once.warnings.messages["duplicate-id"].startswith("id 'a-0' is used by 2 records")


def test_a_mix_without_repeats_scans_as_before(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("a", 3))
    index = open_records(_mix(tmp_path, {"name": "a", "path": "a.jsonl", "repeat": 0.5},
                              {"name": "b", "path": "a.jsonl"}))
    assert isinstance(index, MixIndex) and index.distinct() is None
    assert np.array_equal(index.has_image, np.zeros(len(index), dtype=bool))

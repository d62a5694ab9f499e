"""Fuzzing what data sources are made of: any repeat or weight in a mix file, and a WebDataset
shard cut at any byte. Either every record reads back as written, or one named error (a
`MixError` or `RecordFormatError`, both ValueErrors) on one line: never a silent loss, never
an OverflowError or a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_cli.data.records import RecordFormatError
from llava_cli.data.sources.mix import MAX_POSITIONS, open_records
from llava_cli.data.sources.mixfile import MixError
from tests.data.mixdata import png_bytes, records, write_jsonl, write_tar

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
AMOUNTS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-10**30, 10**30), st.booleans(), st.text(max_size=5),
                    st.none(), st.sampled_from([0, 0.0, 1e-9, 1e9, 1e9 + 1, 2**63, 1e308]))


@FUZZ
@given(field=st.sampled_from(["repeat", "weight"]), first=AMOUNTS, second=AMOUNTS)
def test_any_amount_gives_a_bounded_mix_or_a_named_error(tmp_path: Path, field, first,
                                                         second) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("a", 6))
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [
        {"name": "one", "path": "a.jsonl", field: first},
        {"name": "two", "path": "a.jsonl", field: second}]}))
    try:
        index = open_records(mix)
    except MixError as err:
        assert str(err).startswith(f"{mix}: source ") and "\n" not in str(err)
        return
    assert 0 <= len(index) <= MAX_POSITIONS
    if len(index):
        assert index.read(len(index) - 1)["id"].startswith("a-")


@FUZZ
@given(cut=st.integers(min_value=0, max_value=12 * 1024))
def test_a_shard_cut_anywhere_loses_no_record_silently(tmp_path: Path, cut: int) -> None:
    whole = write_tar(tmp_path / "whole.tar", [
        (f"k{k}", record, png_bytes() if k % 2 else None)
        for k, record in enumerate(records("a", 4))])
    data = whole.read_bytes()
    shard = tmp_path / "cut.tar"
    shard.write_bytes(data[:cut])  # past its length: the whole shard
    try:
        index = open_records(str(shard))
    except RecordFormatError as err:
        assert str(err).startswith(f"{shard}: ") and "\n" not in str(err)
        return
    read = [index.read(i) for i in range(len(index))]
    assert [json.loads(json.dumps(r))["id"] for r in read] == [f"a-{k}" for k in range(4)]

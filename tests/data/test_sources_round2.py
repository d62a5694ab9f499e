"""WebDataset shards never lose a record without a word: a shard cut short, a repeated
sample key, a link member and a shard replaced under its cached index are each named."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.data.records import RecordFormatError
from llava_cli.data.sources.mix import open_records
from tests.data.mixdata import png_bytes, records, write_tar

runner = CliRunner()


def _shard(path: Path, n: int = 4) -> Path:
    samples = [(f"k{i}", r, png_bytes()) for i, r in enumerate(records("a", n, "x.png"))]
    return write_tar(path, samples)


def _offsets(path: Path) -> dict[str, tuple[int, int, int]]:
    """Each member's (header offset, data offset, size)."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_a_shard_cut_inside_a_header_is_named_with_the_offset(tmp_path: Path) -> None:
    whole = _shard(tmp_path / "whole.tar")
    header = _offsets(whole)["k3.json"][0]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:header + 100])  # inside k3.json's header
    with pytest.raises(RecordFormatError) as err:
        open_records(str(cut))
    assert str(err.value) == (
        f"{cut}: no tar member header or end-of-archive blocks at byte offset {header} (the "
        "shard is cut short or damaged there); write the shard again")
    result = runner.invoke(app, ["inspect-data", str(cut), "--demo", "--check"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"at byte offset {header}" in result.stderr and str(cut) in result.stderr
    assert "OK" not in result.stdout


@pytest.mark.parametrize("where", ["data", "boundary", "end blocks"])
def test_a_shard_cut_anywhere_else_is_refused(tmp_path: Path, where: str) -> None:
    whole = _shard(tmp_path / "whole.tar")
    header, data, size = _offsets(whole)["k3.png"]
    length = {"data": data + 10, "boundary": header, "end blocks": data + 512}[where]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:length])
    with pytest.raises(RecordFormatError, match=f"^{cut}: .*cut short"):
        open_records(str(cut))


def test_a_whole_shard_keeps_every_record(tmp_path: Path) -> None:
    index = open_records(str(_shard(tmp_path / "whole.tar")))
    assert [index.read(i)["id"] for i in range(len(index))] == [f"a-{k}" for k in range(4)]


def test_bytes_after_the_end_blocks_are_refused(tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s.tar")
    with open(shard, "ab") as f:
        f.write(b"garbage")
    with pytest.raises(RecordFormatError, match="data after the end-of-archive blocks"):
        open_records(str(shard))


def test_a_repeated_key_is_named(tmp_path: Path) -> None:
    shard = tmp_path / "dup.tar"
    with tarfile.open(shard, "w") as tar:
        for reply in ("first", "second"):
            record = {"id": reply, "conversations": [{"from": "human", "value": "q"},
                                                     {"from": "gpt", "value": reply}]}
            _add(tar, "sub/k0.json", json.dumps(record).encode())
    with pytest.raises(RecordFormatError) as err:
        open_records(str(shard))
    assert str(err.value) == (f"{shard}: sample key 'sub/k0' has two .json members (the "
                              "second would replace the first record); give each sample its "
                              "own key")


@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_a_link_or_special_member_is_refused_by_name(tmp_path: Path, link: bytes) -> None:
    shard = tmp_path / "link.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "k0.json", json.dumps(records("a", 1, "x.png")[0]).encode())
        _add(tar, "other.png", png_bytes())
        info = tarfile.TarInfo("k0.png")
        info.type, info.linkname = link, "other.png"
        tar.addfile(info)
    with pytest.raises(RecordFormatError) as err:
        open_records(str(shard))
    kind = {tarfile.SYMTYPE: "symbolic link (to 'other.png')",
            tarfile.LNKTYPE: "hard link (to 'other.png')",
            tarfile.FIFOTYPE: "device or fifo"}[link]
    assert str(err.value) == (f"{shard}: member 'k0.png' is a {kind}, not a regular file; "
                              "write the shard with the files themselves (tar --dereference)")


def test_folder_members_are_allowed(tmp_path: Path) -> None:
    shard = tmp_path / "dirs.tar"
    with tarfile.open(shard, "w") as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        _add(tar, "sub/k0.json", json.dumps(records("a", 1)[0]).encode())
    assert open_records(str(shard)).read(0)["id"] == "a-0"


def test_a_shard_replaced_with_the_same_size_and_mtime_is_indexed_again(
        tmp_path: Path) -> None:
    record = records("a", 1, "x.png")[0]
    shard, fresh = tmp_path / "s.tar", tmp_path / "fresh.tar"
    # The same members in the other order: the same size, other offsets.
    write_tar(shard, [("k0", record, png_bytes())])
    with tarfile.open(fresh, "w") as tar:
        _add(tar, "k0.png", png_bytes((20, 12), (1, 2, 3)))
        _add(tar, "k0.json", json.dumps({**record, "id": "new"}).encode())
    assert shard.stat().st_size == fresh.stat().st_size
    cache = tmp_path / "cache"
    assert open_records(str(shard), cache_dir=cache).read(0)["id"] == "a-0"
    stat = shard.stat()
    os.utime(fresh, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(fresh, shard)
    index = open_records(str(shard), cache_dir=cache)
    assert not index.from_cache and index.read(0)["id"] == "new"
    assert open_records(str(shard), cache_dir=cache).from_cache  # unchanged: reused

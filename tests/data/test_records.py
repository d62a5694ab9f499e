"""Tests for llava_cli.records: the lazy record index over LLaVA annotation files."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from llava_cli.data import records
from llava_cli.data.records import RecordFormatError, RecordIndex, default_cache_dir

TRICKY = [
    'he said \\"hi\\" and left',  # written raw below: an escaped quote inside a text
    "ends with a backslash \\",
    "two backslashes then quote \\\\",
    "braces { [ ] } and brackets ]]] {{{ inside",
    'the key "image": "x.jpg" appears in this text',
    "unicode: café naïve 日本語 中文 한국어 😀🚀",
    "",
]


def sample(i: int, rng: random.Random) -> dict:
    """One LLaVA-like record; every 5th is text-only, every 7th has two images, every 11th
    gives them under "images" (as Mantis-style data does)."""
    text = rng.choice(TRICKY) + " " + "word " * rng.randint(0, 40)
    rec: dict = {"id": f"{i:06d}"}
    if i % 5:
        key = "images" if i % 11 == 0 else "image"
        rec[key] = [f"a/{i}.jpg", f"b/{i}.jpg"] if i % 7 == 0 else f"coco/{i:012d}.jpg"
    rec["conversations"] = [
        {"from": "human", "value": ("<image>\n" if i % 5 else "") + text},
        {"from": "gpt", "value": rng.choice(TRICKY) * rng.randint(1, 3)},
    ]
    return rec


def dataset(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [sample(i, rng) for i in range(n)]


def expected_has_image(recs: list[dict]) -> list[bool]:
    """As `parse_record` reads a record: "image" when given, else "images"."""
    return [r.get("image", r.get("images")) not in (None, "", []) for r in recs]


def write_json(path: Path, recs: list, **kw: object) -> Path:
    path.write_text(json.dumps(recs, **kw), encoding="utf-8")
    return path


def check(index: RecordIndex, recs: list[dict]) -> None:
    """The index agrees with json.load element for element."""
    assert len(index) == len(recs)
    assert [index.read(i) for i in range(len(recs))] == recs
    assert index.has_image.tolist() == expected_has_image(recs)


@pytest.mark.parametrize("kw", [{}, {"indent": 2}, {"ensure_ascii": False, "indent": "\t"}])
def test_json_array_compact_and_pretty(tmp_path: Path, kw: dict) -> None:
    recs = dataset()
    index = RecordIndex.open(write_json(tmp_path / "d.json", recs, **kw), cache_dir=tmp_path)
    check(index, recs)
    assert index.read(-1) == recs[-1]
    with pytest.raises(IndexError):
        index.read(len(recs))


def test_jsonl_with_blank_lines(tmp_path: Path) -> None:
    recs = dataset(30)
    lines = [json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(recs)]
    text = "\n\n" + "\n".join(lines[:10]) + "\n\n\n" + "\r\n".join(lines[10:]) + "\n  \n"
    path = tmp_path / "d.jsonl"
    path.write_text(text, encoding="utf-8")
    index = RecordIndex.open(path, cache_dir=tmp_path)
    check(index, recs)
    assert index.lines


def test_jsonl_detected_by_content(tmp_path: Path) -> None:
    recs = dataset(5)
    path = tmp_path / "d.txt"
    path.write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    check(RecordIndex.build(path), recs)


def test_has_image_is_a_top_level_key_with_a_value(tmp_path: Path) -> None:
    recs = [
        {"id": "t", "conversations": [{"from": "human", "value": 'the "image" is "image"'}]},
        {"id": "v", "conversations": [{"from": "gpt", "value": "image"}]},
        {"id": "n", "meta": {"image": "x.jpg"}, "conversations": []},
        {"id": "m", "image": ["a.jpg", "b.jpg"], "conversations": []},
        {"id": "s", "image": "a.jpg", "conversations": []},
        {"id": "0", "image": None, "conversations": []},
        {"id": "1", "image": "", "conversations": []},
        {"id": "2", "image": [], "conversations": []},
        {"conversations": [], "image": "last.jpg"},
        {"id": "i", "images": ["a.jpg", "b.jpg"], "conversations": []},
        {"id": "j", "images": [], "conversations": []},
        {"id": "k", "image": None, "images": ["a.jpg"], "conversations": []},
        {"id": "l", "images": None, "image": "a.jpg", "conversations": []},
        {"id": "o", "imagesx": "a.jpg", "images_": "b.jpg", "conversations": []},
    ]
    path = tmp_path / "k.json"
    path.write_text(json.dumps(recs).replace('"image": "a.jpg"', '"image"  :\n "a.jpg"'))
    assert RecordIndex.build(path).has_image.tolist() == [False, False, False, True, True,
                                                           False, False, False, True,
                                                           True, False, False, True, False]
    assert RecordIndex.build(path).has_image.tolist() == expected_has_image(recs)


def test_modality_lengths_signs_and_scale(tmp_path: Path) -> None:
    recs = [
        {"id": "a", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "w " * 100}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "w " * 10}]},
        {"id": "c", "image": "x.jpg", "conversations": [{"from": "gpt", "value": "w"}]},
    ]
    lengths = RecordIndex.build(write_json(tmp_path / "m.json", recs)).modality_lengths()
    assert lengths.dtype == np.int64
    assert lengths[0] > 0 and lengths[1] < 0 and lengths[2] > 0
    assert lengths[0] > lengths[2] + 190 and -lengths[1] > 20  # ~bytes of text


def test_cache_is_reused_then_rebuilt_after_change(tmp_path: Path, monkeypatch) -> None:
    path = write_json(tmp_path / "d.json", dataset(20))
    cache = tmp_path / "cache"
    first = RecordIndex.open(path, cache_dir=cache)
    assert not first.from_cache
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob("*.tmp"))

    def no_scan(*args: object) -> None:
        raise AssertionError("rescanned although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(records, "build_arrays", no_scan)
        second = RecordIndex.open(path, cache_dir=cache)
    assert second.from_cache
    for name in ("offsets", "sizes", "has_image", "text_bytes"):
        assert np.array_equal(getattr(first, name), getattr(second, name))
    assert second.read(3) == first.read(3)

    recs = dataset(25, seed=1)
    write_json(path, recs)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = RecordIndex.open(path, cache_dir=cache)
    assert not third.from_cache
    check(third, recs)
    assert RecordIndex.open(path, cache_dir=cache).from_cache
    assert len(list(cache.glob("*.npz"))) == 1  # the stale entry was replaced


def test_cache_dir_from_env_and_unwritable_fallback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLAVA_CLI_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root" / "index"
    recs = dataset(10)
    path = write_json(tmp_path / "d.json", recs)
    RecordIndex.open(path)
    assert len(list((tmp_path / "root" / "index").glob("d.json.*.npz"))) == 1
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a file where a directory should be: unwritable even for root
    for _ in range(2):
        index = RecordIndex.open(path, cache_dir=blocker / "index")
        assert not index.from_cache
        check(index, recs)


def test_chunk_boundaries_inside_strings_and_escapes(tmp_path: Path) -> None:
    recs = dataset(150, seed=2)
    recs.append({"id": "big", "conversations": [{"value": "\\\\\"" * 400}]})  # > chunk size
    path = write_json(tmp_path / "d.json", recs, indent=1)
    ref = RecordIndex.build(path)
    check(ref, recs)
    for chunk in (64, 128, 192, 320, 1000, 4096):
        index = RecordIndex.build(path, chunk_size=chunk)
        for name in ("offsets", "sizes", "has_image", "text_bytes"):
            assert np.array_equal(getattr(index, name), getattr(ref, name)), (chunk, name)
    lines = tmp_path / "d.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in recs))
    for chunk in (64, 200):
        check(RecordIndex.build(lines, chunk_size=chunk), recs)


def error(path: Path, text: str) -> str:
    path.write_text(text)
    with pytest.raises(RecordFormatError) as e:
        RecordIndex.build(path, chunk_size=64)
    return str(e.value)


def test_errors_name_the_file_and_place(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    good = '{"id": "a", "image": "x.jpg"}'
    assert error(p, f'[{good}, {good[:-5]}') == (
        f"{p}: unexpected end of file inside record #1 (starts at byte 32); the file looks "
        "truncated - re-download or regenerate it")
    assert error(p, f"[{good}, ") == (
        f"{p}: unexpected end of file at byte 32: the top-level JSON array is not closed "
        "with ']'; the file looks truncated - re-download or regenerate it")
    assert error(p, f'[{good}, 42, {good}]') == (
        f"{p}: byte 32: record #1 is not a JSON object (it starts with '42, "
        "{\"id\": \"a\", \"image\":'); each element of the top-level array must be one sample "
        "object - fix or remove it")
    assert error(p, f"[{good}, [1]]").startswith(f"{p}: byte 32: record #1 is not a JSON object")
    assert error(p, f"[{good},]") == f"{p}: byte 31: unexpected ',' before the closing ']'"
    assert error(p, f"[{good}] x") == f"{p}: byte 32: unexpected data after the closing ']'"
    assert error(p, '"text"') == (
        f"{p}: expected a JSON array ('[') or JSON Lines ('{{'), found '\"'; give a LLaVA "
        "annotation file")
    q = tmp_path / "t.jsonl"
    assert error(q, f"{good}\n\n{good}\nnot json\n{good}\n") == (
        f"{q}: line 4: expected a JSON object, found 'not json'; fix or remove the line")
    assert error(q, f'{good}\n{{"id": [1}}\n{good}\n') == (
        f"{q}: line 2: JSON object is not closed (truncated line or unbalanced brackets); "
        "fix or remove that line")
    assert error(q, f"{good} {good}\n") == f"{q}: line 1: more than one JSON value on one line"


def test_read_reports_a_broken_record(tmp_path: Path) -> None:
    p = tmp_path / "b.json"
    p.write_text('[{"id": "a"}, {"id": tru}]')
    index = RecordIndex.build(p)
    assert index.read(0) == {"id": "a"}
    with pytest.raises(RecordFormatError, match=r"b\.json: record #1 \(byte 14\) is not valid"):
        index.read(1)


def test_read_refuses_a_changed_file(tmp_path: Path) -> None:
    p = write_json(tmp_path / "d.json", dataset(5))
    index = RecordIndex.build(p)
    write_json(p, dataset(6))
    with pytest.raises(RecordFormatError, match="changed after it was indexed"):
        index.read(0)


def test_pickle_and_fork(tmp_path: Path) -> None:
    recs = dataset(40)
    index = RecordIndex.open(write_json(tmp_path / "d.json", recs), cache_dir=tmp_path)
    assert index.read(1) == recs[1]  # the parent holds an open handle now
    clone = pickle.loads(pickle.dumps(index))
    assert clone._fh is None and [clone.read(i) for i in range(40)] == recs
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own handle, not share the parent's offset
        try:
            got = [index.read(i) for i in (5, 30, 2)]
            ok = got == [recs[5], recs[30], recs[2]] and index._pid == os.getpid()
            os.write(wfd, b"ok" if ok else b"bad")
        finally:
            os._exit(0)
    os.close(wfd)
    assert os.read(rfd, 8) == b"ok"
    os.waitpid(pid, 0)
    assert index.read(7) == recs[7] and index._pid == os.getpid()


def test_fuzz_against_json_load(tmp_path: Path) -> None:
    rng = random.Random(3)
    atoms = ["\\", '"', "{", "}", "[", "]", "y", "_", "Y", "\x7f", " ", "image", '"image"', ":",
             ",", "é", "😀", "日本", "\n", "\t", "\x00", "a", "\\\\", '\\"']
    values = [None, "", [], [1], "s", 0, {}, {"image": "x"}, False]

    def text() -> str:
        return "".join(rng.choice(atoms) for _ in range(rng.randint(0, 30)))

    recs = []
    for _ in range(200):
        rec = {rng.choice(["image", "id", "imagex", "imag", text()]): rng.choice(values)
               for _ in range(rng.randint(0, 3))}
        rec["conversations"] = [{"from": text(), "value": text()} for _ in range(2)]
        recs.append(rec)
    for i, kw in enumerate([{}, {"ensure_ascii": False}, {"indent": 1, "ensure_ascii": False}]):
        path = write_json(tmp_path / f"f{i}.json", recs, **kw)
        for chunk in (64, 448, 1 << 20):
            check(RecordIndex.build(path, chunk_size=chunk), recs)


def test_bom_and_empty_files(tmp_path: Path) -> None:
    recs = dataset(3)
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(recs).encode())
    check(RecordIndex.build(bom), recs)
    for name, text in (("e.json", " [ ]\n"), ("e.jsonl", ""), ("b.jsonl", "\n\n")):
        (tmp_path / name).write_text(text)
        assert len(RecordIndex.build(tmp_path / name)) == 0
    assert "found an empty file" in error(tmp_path / "e2.json", "  \n")


def test_a_json_object_at_the_top_is_refused(tmp_path: Path) -> None:
    recs = dataset(3)
    top_level = (f"{tmp_path / 'o.json'}: the top level must be a list of records "
                 "([{...}, {...}]), not a JSON object; put the records in a list, or give "
                 "JSON Lines (one record per line, .jsonl)")
    # One object holding the records (compact or pretty), or a single record, in a .json file.
    for text in (json.dumps({"data": recs}), json.dumps({"data": recs}, indent=2),
                 json.dumps(recs[0]), json.dumps(recs[0], indent=1)):
        assert error(tmp_path / "o.json", text) == top_level
    # A .jsonl (or any other name) whose first record spans lines is not JSON Lines either.
    assert error(tmp_path / "o.jsonl", json.dumps(recs[0], indent=2)) == (
        f"{tmp_path / 'o.jsonl'}: line 1: record #0 spans several lines; JSON Lines holds one "
        "record per line")
    assert error(tmp_path / "o.txt", "\n" + json.dumps({"data": recs}, indent=2)).startswith(
        f"{tmp_path / 'o.txt'}: the top level must be a list of records")
    # JSON Lines stays JSON Lines: one record in a .jsonl, several lines in a .json.
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(recs[0]) + "\n")
    check(RecordIndex.build(one), recs[:1])
    lines = tmp_path / "l.json"
    lines.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    check(RecordIndex.build(lines), recs)

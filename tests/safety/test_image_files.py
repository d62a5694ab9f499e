"""Hostile and broken image files, and image paths that leave the image folder: each one is a
named problem wherever a user meets it (`inspect-data --check`, the record view, training's
data checks, dataloader workers), never a crash, a traceback or a decoded bomb.

(Named `test_image_files.py`, not `test_images.py`: `tests/data/test_images.py` has that
basename, and without `__init__.py` files pytest cannot collect two modules of one name.)
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.data.images import ImageError, check_image, load_image
from tests.helpers import TINY_LLM, TINY_VISION

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"
LIMIT = Image.MAX_IMAGE_PIXELS  # Pillow's default, 89,478,485


def too_large(width: int, height: int) -> str:
    """The reason every path gives for an image over Pillow's default limit."""
    return (f"image too large ({width}×{height} = {width * height:,} pixels > limit of "
            f"{LIMIT:,}, PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb, or a picture to "
            "shrink before training")


def write_blank_png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of `width`×`height` black pixels, written row by row: a 30000×30000
    one (900 megapixels, 2.7 GB as RGB) is 0.5 MB on disk and takes 0.2 s to write."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(1)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory, assets: Path) -> Path:
    """An image folder with one of each: good, bombs, huge, truncated; and a file beside it."""
    root = tmp_path_factory.mktemp("image-files")
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "good.png")
    write_blank_png(images / "bomb.png", 30000, 30000)  # over twice the limit: Pillow's error
    write_blank_png(images / "warn.png", 10000, 10000)  # 1x-2x: Pillow only warns
    write_blank_png(images / "huge.png", 8500, 8000)  # 68 megapixels: under the limit
    shutil.copy(assets / "images" / "extreme_ironing_truncated.jpg", images / "cut.jpg")
    Image.new("RGB", (20, 20), (0, 0, 200)).save(root / "outside.png")
    return images


def _record(rid: str, image: str | None, reply: str = "red") -> dict:
    turns = [{"from": "human", "value": "<image>\nColour?" if image else "Colour?"},
             {"from": "gpt", "value": reply}]
    return {"id": rid, **({"image": image} if image else {}), "conversations": turns}


def _data(folder: Path, name: str, records: list | dict, indent: int | None = None) -> Path:
    path = folder.parent / name
    path.write_text(json.dumps(records, indent=indent))
    return path


def _inspect(data: Path, folder: Path, *args: str):
    result = runner.invoke(app, ["inspect-data", str(data), "--demo", "--image-folder",
                                 str(folder), *args])
    assert TRACEBACK not in result.output
    return result


def _report(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


# --- the image checks themselves -----------------------------------------------------------


def test_a_bomb_is_refused_from_its_header_and_never_decoded(folder, monkeypatch):
    bomb = folder / "bomb.png"
    assert bomb.stat().st_size < 1_000_000

    def no_decode(self):
        raise AssertionError("a decompression bomb must never be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    for check in (check_image, lambda p, label: check_image(p, label=label, full=True),
                  lambda p, label: load_image(p, label=label)):
        with pytest.raises(ImageError) as info:
            check(bomb, label="bomb.png")
        assert str(info.value) == \
            f"image 'bomb.png' (resolved to {bomb}): {too_large(30000, 30000)}"


def test_between_one_and_two_times_the_limit_is_an_error_too(folder):
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for full in (False, True):
            with pytest.raises(ImageError) as info:
                check_image(folder / "warn.png", full=full)
            assert info.value.reason == too_large(10000, 10000)
        with pytest.raises(ImageError, match=r"image too large \(10000×10000"):
            load_image(folder / "warn.png")
    # Pillow's DecompressionBombWarning became the error without escaping as a warning, and the
    # process's filters are as they were.
    assert [w.category.__name__ for w in seen] == []
    assert warnings.filters == filters


def test_the_limit_is_pillows_own_at_each_call(folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10**9)  # a user who raised it
    assert check_image(folder / "bomb.png") == (30000, 30000)  # whole: nothing decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # ... or lifted it
    assert check_image(folder / "bomb.png") == (30000, 30000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=r"40×30 = 1,200 pixels > limit of 1,000"):
        check_image(folder / "good.png")


# --- inspect-data, where users meet it -----------------------------------------------------


def _everything(folder: Path) -> list[dict]:
    return [_record("good", "good.png"), _record("bomb", "bomb.png"),
            _record("warn-bomb", "warn.png"), _record("cut", "cut.jpg"),
            _record("up", "../outside.png"), _record("abs", str(folder.parent / "outside.png")),
            _record("huge", "huge.png"), _record("empty", "good.png", reply=" \n"),
            _record("good", None)]


def test_check_names_every_bad_image_path_and_warning(folder):
    data = _data(folder, "everything.json", _everything(folder))
    result = _inspect(data, folder, "--check", "--format", "json", "--workers", "1")
    assert result.exit_code == 1, result.output
    report = _report(result)
    assert report["records"] == 9 and report["ok"] is False
    assert report["problems"] == {"bad-image": 3, "image-outside-folder": 2}
    assert report["warnings"] == {"huge-image": 1, "empty-reply": 1, "duplicate-id": 1}
    examples = report["examples"]
    assert examples["bad-image"] == ["bomb", "warn-bomb", "cut"]
    assert examples["image-outside-folder"] == ["up", "abs"]
    assert (examples["huge-image"], examples["empty-reply"], examples["duplicate-id"]) == (
        ["huge"], ["empty"], ["good"])
    assert report["first_messages"] == {
        "bad-image": f"record 'bomb': image 'bomb.png' (resolved to {folder / 'bomb.png'}): "
                     f"{too_large(30000, 30000)}",
        "image-outside-folder": f"record 'up': image '../outside.png' resolves to "
                                f"{folder.parent / 'outside.png'}, outside the image folder "
                                f"{folder} (allow such paths with --set "
                                "allow_images_outside_folder=true)"}
    assert report["warning_messages"] == {
        "huge-image": "record 'huge' has a 8500×8000 image (68 megapixels, over 64): every "
                      "epoch decodes it in full; shrink such images once, beforehand",
        "empty-reply": "record 'empty' has an empty gpt reply: training on it teaches the "
                       "model to answer nothing",
        "duplicate-id": "id 'good' is used by 2 records (#0, #8)"}


def test_each_record_says_what_is_wrong_with_it(folder):
    data = _data(folder, "everything.json", _everything(folder))
    result = _inspect(data, folder, "--format", "jsonl")
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    errors = {line["id"]: (line["kind"], line["error"]) for line in lines if "error" in line}
    assert set(errors) == {"bomb", "warn-bomb", "cut", "up", "abs"}
    assert errors["warn-bomb"] == ("bad-image", f"record 'warn-bomb': image 'warn.png' (resolved "
                                   f"to {folder / 'warn.png'}): {too_large(10000, 10000)}")
    kind, message = errors["cut"]
    assert kind == "bad-image" and message.startswith(
        f"record 'cut': image 'cut.jpg' (resolved to {folder / 'cut.jpg'}): cannot be decoded: "
        "image file is truncated (")
    assert errors["abs"][0] == "image-outside-folder"


def test_the_rich_report_on_two_processes(folder):
    # 2,070 records: two slices of the scan (2,000 each), so both worker processes work, and
    # the duplicate ids are found across them.
    data = _data(folder, "many.json", _everything(folder) * 230)
    result = _inspect(data, folder, "--check", "--workers", "2")
    assert result.exit_code == 1
    text = " ".join(result.output.split())  # Rich wraps long lines
    assert "FAILED" in text and "image-outside-folder" in text
    assert f"bad-image: record 'bomb': image 'bomb.png' (resolved to {folder / 'bomb.png'}): " \
        f"{too_large(30000, 30000)}" in text
    assert "duplicate-id (warning): id 'good' is used by 460 records (#0, #8, #9, #17, #18, …)" \
        in text


def test_paths_outside_the_folder_only_when_allowed(folder):
    records = [_record("good", "good.png"), _record("up", "../outside.png"),
               _record("abs", str(folder.parent / "outside.png"))]
    data = _data(folder, "outside.json", records)
    refused = _inspect(data, folder, "--check", "--format", "json", "--workers", "1")
    assert refused.exit_code == 1 and _report(refused)["problems"] == {"image-outside-folder": 2}
    for allow in (["--allow-images-outside-folder"], ["--set", "allow_images_outside_folder=true"]):
        allowed = _inspect(data, folder, "--check", "--format", "json", "--workers", "1", *allow)
        assert allowed.exit_code == 0, allowed.output
        assert _report(allowed)["problems"] == {}


def test_full_decode_finds_what_the_fast_check_cannot(folder):
    # A PNG whose compressed pixels are garbage, its CRCs and IEND chunk intact: the header
    # and the end are those of a whole file; only decoding it shows the damage.
    data = (folder / "good.png").read_bytes()
    at = data.index(b"IDAT")
    size = int.from_bytes(data[at - 4:at], "big")
    body = b"\x55" * size
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body))
    (folder / "garbled.png").write_bytes(data[:at + 4] + body + crc + data[at + 8 + size:])
    records = _data(folder, "garbled.json", [_record("good", "good.png"),
                                             _record("garbled", "garbled.png")])
    fast = _inspect(records, folder, "--check", "--format", "json", "--workers", "1")
    assert fast.exit_code == 0, fast.output
    full = _inspect(records, folder, "--check", "--format", "json", "--workers", "1",
                    "--full-decode")
    assert full.exit_code == 1
    assert _report(full)["first_messages"]["bad-image"].startswith(
        f"record 'garbled': image 'garbled.png' (resolved to {folder / 'garbled.png'}): "
        "cannot be decoded: ")


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_object_at_the_top_is_the_top_level_must_be_a_list(folder, indent):
    data = _data(folder, f"object{indent}.json", {"data": [_record("good", "good.png")]}, indent)
    for args in ((), ("--check",)):
        result = _inspect(data, folder, *args)
        assert result.exit_code == 2
        assert result.stderr.strip() == (
            f"llava inspect-data: {data}: the top level must be a list of records "
            "([{...}, {...}]), not a JSON object; put the records in a list, or give JSON "
            "Lines (one record per line, .jsonl)")


def test_an_empty_list_is_no_records(folder):
    data = _data(folder, "empty.json", [])
    result = _inspect(data, folder, "--check", "--format", "json")
    assert result.exit_code == 1
    report = _report(result)
    assert report["records"] == 0 and report["problems"] == {"no-records": 1}
    assert report["first_messages"] == {
        "no-records": f"{data} holds no records: there is nothing to train on"}
    shown = _inspect(data, folder, "--check")
    assert shown.exit_code == 1 and "FAILED: the file holds no records" in shown.output
    assert "--skip-bad-records" not in shown.output


def test_an_empty_data_file_stops_training_with_one_line(folder, tmp_path):
    data = _data(folder, "empty.json", [])
    result = runner.invoke(app, [
        "finetune", "--model-name-or-path", str(TINY_LLM), "--vision-tower", str(TINY_VISION),
        "--tokenizer", "demo", "--random-init", "--data-path", str(data), "--image-folder",
        str(folder), "--max-steps", "1", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and TRACEBACK not in result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"llava finetune: training data {data} holds no records; give a file with at least "
        "one LLaVA record")


# --- training: its data checks and its dataloader workers ----------------------------------


def test_a_bomb_in_held_out_data_stops_training_before_the_first_step(folder, tmp_path):
    train = _data(folder, "train.json", [_record(f"t{i}", "good.png") for i in range(4)])
    held_out = _data(folder, "held_out.json", [_record("e0", "good.png"),
                                               _record("bomb", "bomb.png")])
    result = runner.invoke(app, [
        "finetune", "--model-name-or-path", str(TINY_LLM), "--vision-tower", str(TINY_VISION),
        "--tokenizer", "demo", "--random-init", "--data-path", str(train), "--image-folder",
        str(folder), "--eval-data-path", str(held_out), "--max-steps", "2", "--batch-size", "2",
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert TRACEBACK not in result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"llava finetune: held-out data {held_out}: 1 of 2 record(s) cannot "
                           "be evaluated (bad-image: 1 (e.g. bomb)); fix them or pass "
                           "--skip-bad-records.")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def dataset_parts():
    from transformers import CLIPImageProcessorPil

    from llava_cli.model.inputs import input_spec_from_paths

    spec = input_spec_from_paths("demo", image_tokens=4)
    return spec, CLIPImageProcessorPil(size={"shortest_edge": 32},
                                       crop_size={"height": 32, "width": 32})


def _loader_items(folder: Path, dataset_parts, skip: bool) -> list[dict]:
    import torch

    from llava_cli.data.batching.collator import DataCollator
    from llava_cli.data.dataset import LazySupervisedDataset
    from llava_cli.data.records import RecordIndex
    from llava_cli.data.samples import DataOptions, SampleBuilder

    spec, processor = dataset_parts
    records = [_record("a", "good.png"), _record("bomb", "bomb.png"), _record("b", "good.png"),
               _record("warn-bomb", "warn.png"), _record("c", "good.png"), _record("d", None)]
    path = _data(folder, f"loader-{skip}.json", records)
    builder = SampleBuilder(DataOptions(template="v1", image_folder=str(folder)), spec)
    dataset = LazySupervisedDataset(RecordIndex.build(path), builder, processor, skip)
    collate = DataCollator(pad_token_id=spec.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         multiprocessing_context="fork", collate_fn=collate)
    return list(loader)


def test_a_bomb_in_a_worker_is_a_dropped_record_with_skip_bad_records(folder, dataset_parts):
    from llava_cli.data.problems import Dropped

    batches = _loader_items(folder, dataset_parts, skip=True)
    dropped = [drop for batch in batches for drop in batch.get("dropped_records", [])]
    assert dropped == [Dropped(1, "bad-image", "bomb"), Dropped(3, "bad-image", "warn-bomb")]
    assert all(batch["input_ids"].shape[0] == 2 for batch in batches)  # refilled, not short


def test_a_bomb_in_a_worker_is_the_record_error_without_it(folder, dataset_parts):
    batches = _loader_items(folder, dataset_parts, skip=False)
    errors = [error for batch in batches for error in batch.get("record_errors", [])]
    # What the trainer raises in the main process (`RecordError(*errors[0])`): the named
    # problem, not a worker's DecompressionBombError traceback.
    assert errors == [
        ("bomb", "bad-image", f"image 'bomb.png' (resolved to {folder / 'bomb.png'}): "
                              f"{too_large(30000, 30000)}"),
        ("warn-bomb", "bad-image", f"image 'warn.png' (resolved to {folder / 'warn.png'}): "
                                   f"{too_large(10000, 10000)}")]

"""Bad training data is caught before the model loads, with one short message naming the
records, and a bad record met later (an image whose pixels are garbage behind an intact header
and end passes the fast check) gives the same message with dataloader workers as without."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.inspect.inspection import demo_data
from tests.helpers import TINY_LLM, TINY_VISION

RECORDS, IMAGES = demo_data()


def _data(tmp_path: Path, extra: list[dict]) -> Path:
    records = json.loads(Path(RECORDS).read_text()) + extra
    shutil.copytree(Path(IMAGES) / "images", tmp_path / "images")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def _finetune(tmp_path: Path, data: Path, *extra: str, vision: str = str(TINY_VISION)):
    return CliRunner().invoke(app, [
        "finetune", "--model-name-or-path", str(TINY_LLM), "--vision-tower", vision,
        "--tokenizer", "demo", "--random-init", "--data-path", str(data), "--image-folder",
        str(tmp_path), "--max-steps", "2", "--batch-size", "2", "-o", str(tmp_path / "out"),
        *extra])


def _record(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]}


def test_a_missing_image_stops_the_run_before_the_model_loads(tmp_path):
    data = _data(tmp_path, [_record("lost", "images/nowhere.png")])
    # A vision tower folder with no model in it: had the model been built first, that would
    # be the error; the data check comes before it.
    (tmp_path / "no-such-tower").mkdir()
    result = _finetune(tmp_path, data, vision=str(tmp_path / "no-such-tower"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, message
    assert "training data" in message[0] and "1 of 6 record(s) cannot be trained on" in \
        message[0] and "bad-image: 1 (e.g. lost)" in message[0]
    assert "--skip-bad-records" in message[0] and "inspect-data" in message[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_skip_bad_records_warns_and_trains(tmp_path, caplog):
    data = _data(tmp_path, [_record("lost", "images/nowhere.png")])
    result = _finetune(tmp_path, data, "--skip-bad-records")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("workers", ["0", "1"])
def _garbled_png(target: Path) -> None:
    """A PNG whose compressed pixels are garbage, its CRCs and IEND chunk intact."""
    import io
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 10, 10)).save(buffer, "PNG")
    data = buffer.getvalue()
    at = data.index(b"IDAT")
    size = int.from_bytes(data[at - 4:at], "big")
    body = b"\x55" * size
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body))
    target.write_bytes(data[:at + 4] + body + crc + data[at + 8 + size:])


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_record_that_fails_to_decode_gives_one_message_with_or_without_workers(
        tmp_path, workers):
    _garbled_png(tmp_path / "cut.png")
    data = _data(tmp_path, [_record("cut", "cut.png")] * 4)  # the fast check passes
    result = _finetune(tmp_path, data, "--dataloader-num-workers", workers)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "DataLoader worker" not in result.output
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("llava finetune: record 'cut': image 'cut.png'")
    assert "cannot be decoded" in line

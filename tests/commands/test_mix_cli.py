"""`llava inspect-data MIX --check`: a mix file is checked as a data file is, with records
named by their source and position."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.data.mixdata import png_bytes, records, turns, write_jsonl, write_tar

runner = CliRunner()


def _mix(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.png").write_bytes(png_bytes((20, 10)))
    write_jsonl(tmp_path / "a.jsonl", records("a", 3, image="ok.png") + records("esc", 1,
                image="../a.jsonl"))
    write_tar(tmp_path / "b.tar", [
        ("k0", {"id": "b-0", "conversations": turns("<image>\nq", "a")}, png_bytes((9, 5))),
        ("k1", {"conversations": turns("<image>\nq", "a")}, b"broken bytes"),
        ("k2", {"conversations": turns("plain", "text")}, None)])
    mix = tmp_path / "mix.yaml"
    mix.write_text(yaml.safe_dump({"sources": [
        {"name": "json", "path": "a.jsonl", "image_folder": "images"},
        {"name": "shards", "path": "b.tar", "repeat": 2}]}))
    return mix


def _check(mix: Path, *extra: str):
    result = runner.invoke(app, ["inspect-data", str(mix), "--demo", "--check", "--format",
                                 "json", *extra])
    return result, json.loads(result.stdout[result.stdout.index("{"):])


def test_check_scans_a_mix_and_names_records_by_source(tmp_path: Path) -> None:
    result, report = _check(_mix(tmp_path), "--workers", "1")
    assert result.exit_code == 1, result.output
    assert report["records"] == 4 + 3 * 2
    assert (report["image_records"], report["text_only_records"]) == (8, 2)
    assert report["problems"] == {"bad-image": 2, "image-outside-folder": 1}
    assert report["examples"]["bad-image"] == ["shards#1"]  # no id: source and position
    assert report["examples"]["image-outside-folder"] == ["esc-0"]
    assert "duplicate-id" not in report["warnings"]  # b-0 twice by repeat: one record


def test_check_of_a_mix_on_two_processes_matches_one(tmp_path: Path) -> None:
    mix = _mix(tmp_path)
    _, one = _check(mix, "--workers", "1")
    _, two = _check(mix, "--workers", "2")
    assert one == two


def test_a_bad_mix_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "mix.yaml").write_text("sources: [{path: gone.jsonl}]\n")
    result = runner.invoke(app, ["inspect-data", str(tmp_path / "mix.yaml"), "--demo",
                                 "--check"])
    assert result.exit_code == 2
    assert "source '#0': path 'gone.jsonl' not found" in result.output
    assert "Traceback" not in result.output


def test_show_records_of_a_mix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect-data", str(_mix(tmp_path)), "--demo", "--format",
                                 "jsonl", "--limit", "5"])
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [row.get("id") for row in rows][:4] == ["a-0", "a-1", "a-2", "esc-0"]

"""`llava inspect-data` on preference data (`llava dpo`'s): the file's kind, the pair view (the
prompt once, both replies with their supervised spans), JSON lines with both rows, `--check`
with `PairBuilder`, and files that mix the two kinds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.data.text.encoding import IGNORE_INDEX
from tests.helpers import require_assets

runner = CliRunner()
SFT = {"id": "sft", "conversations": [{"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello"}]}


def _pair(rid: str, chosen="square", rejected="circle", **extra) -> dict:
    return {"id": rid, "image": "extreme_ironing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is he doing?"},
        {"from": "gpt", "value": "Ironing."},
        {"from": "human", "value": "Where?"}], "chosen": chosen, "rejected": rejected, **extra}


def _write(tmp_path: Path, records: list, name: str = "pairs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _images() -> Path:
    """The shared assets' images (the pairs' pictures); skips the test without them."""
    return require_assets() / "images"


def _invoke(path: Path, *args: str):
    return runner.invoke(app, ["inspect-data", str(path), "--demo", "--image-folder",
                               str(_images()), "--workers", "1", *args])


def _report(result) -> dict:
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_preview_shows_the_prompt_once_and_both_replies(tmp_path):
    path = _write(tmp_path, [_pair("p1", "On a taxi.", "In a kitchen.")])
    result = _invoke(path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "record 'p1' (#0) · preference pair" in out
    assert out.count("What is he doing?") == 1 and out.count("<image ×64>") == 1
    assert "chosen ·" in out and "rejected ·" in out
    assert "On a taxi." in out and "In a kitchen." in out
    assert "preference pairs: only each reply is supervised" in " ".join(out.split())


def test_pair_panel_highlights_exactly_each_reply():
    from llava_cli.config.resolve import resolve_config
    from llava_cli.data.preference_pairs import PairBuilder
    from llava_cli.inspect.inspection import make_builder
    from llava_cli.inspect.pair_view import pair_panel, prompt_length
    from llava_cli.inspect.view import SUPERVISED_STYLE

    config = resolve_config("inspect-data", flags={"tokenizer": "demo",
                                                  "image_folder": str(_images())})
    builder = make_builder(config, 16)
    pair = PairBuilder(builder).build(_pair("p", "On a taxi.", "In a kitchen."))
    texts = [part for part in pair_panel(pair, builder.tokenizer, 0, False).renderable.renderables
             if hasattr(part, "spans") and part.plain not in ("prompt",)]
    supervised = [[text.plain[s.start:s.end] for s in text.spans if s.style == SUPERVISED_STYLE]
                  for text in texts]
    # The prompt (its earlier gpt turn included) has nothing supervised; each reply its text
    # and end of turn, as training labels them.
    prompt_text = next(t for t in texts if "What is he doing?" in t.plain)
    assert supervised[texts.index(prompt_text)] == []
    decoded = [builder.tokenizer.decode([x for x in side.encoded.labels if x != IGNORE_INDEX])
               for side in (pair.chosen, pair.rejected)]
    assert [s for s in supervised if s] == [[decoded[0]], [decoded[1]]]
    assert "On a taxi." in decoded[0] and "In a kitchen." in decoded[1]
    split = prompt_length(pair)
    assert pair.chosen.encoded.input_ids[:split] == pair.rejected.encoded.input_ids[:split]
    assert all(x == IGNORE_INDEX for x in pair.chosen.encoded.labels[:split])


def test_jsonl_has_both_rows_as_training_builds_them(tmp_path):
    llama = require_assets() / "tokenizers" / "llava-1.5-7b-hf"
    from llava_cli.config.resolve import resolve_config
    from llava_cli.data.preference_pairs import PairBuilder
    from llava_cli.inspect.inspection import make_builder

    records = [_pair("p1", "On a taxi.", "In a kitchen."),
               {"id": "trl", "images": ["chelsea_cat.png"], "prompt": [
                   {"role": "user", "content": [{"type": "image"},
                                                {"type": "text", "text": "What animal?"}]}],
                "chosen": [{"role": "assistant", "content": "A cat."}],
                "rejected": [{"role": "assistant", "content": "A dog."}]}]
    path = _write(tmp_path, records)
    result = runner.invoke(app, ["inspect-data", str(path), "--tokenizer", str(llama),
                                 "--image-folder", str(_images()), "--image-tokens", "8",
                                 "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    config = resolve_config("inspect-data", flags={"tokenizer": str(llama),
                                                  "image_folder": str(_images())})
    builder = PairBuilder(make_builder(config, 8))
    for line, record in zip(lines, records, strict=True):
        pair = builder.build(record)
        assert line["id"] == record["id"]
        for side in ("chosen", "rejected"):
            assert line[side]["input_ids"] == getattr(pair, side).encoded.input_ids
            assert line[side]["labels"] == getattr(pair, side).encoded.labels
            assert line[side]["n_supervised"] > 0 and line[side]["truncated"] is False
        n = line["prompt_length"]
        assert line["chosen"]["input_ids"][:n] == line["rejected"]["input_ids"][:n]
        assert set(line["chosen"]["labels"][:n]) == {IGNORE_INDEX}
        assert line["chosen"]["labels"][n] != IGNORE_INDEX
        assert line["chosen"]["input_ids"].count(32000) == 8  # llava-1.5's <image> id
    tok = builder.tokenizer
    assert tok.decode([x for x in lines[1]["rejected"]["labels"] if x != IGNORE_INDEX]) \
        == "A dog.</s>"


def test_check_reports_bad_pairs_by_id_and_field(tmp_path):
    ends_with_gpt = _pair("gpt-last")
    ends_with_gpt["conversations"] = ends_with_gpt["conversations"][:2]
    records = [_pair("good"), _pair("no-chosen"), _pair("number", rejected=7), ends_with_gpt,
               _pair("long", chosen="word " * 40), _pair("vote", preference=3)]
    del records[1]["chosen"]
    for record in records[-1:]:
        record.update(output_1="a", output_2="b")
    result = _invoke(_write(tmp_path, records), "--check", "--format", "json",
                     "--model-max-length", "130")
    assert result.exit_code == 1, result.output
    report = _report(result)
    assert report["record_kind"] == "preference" and report["records"] == 6
    assert report["problems"] == {"bad-field": 3, "role-error": 1}
    assert report["examples"]["bad-field"] == ["no-chosen", "number", "vote"]
    assert report["examples"]["role-error"] == ["gpt-last"]
    assert "no 'chosen' reply" in report["first_messages"]["bad-field"]
    assert report["truncated"] == 1 and report["examples"]["truncated"] == ["long"]
    assert report["ok"] is False


def test_check_a_pair_with_a_reply_truncated_away_is_fully_masked(tmp_path):
    records = [_pair("ok"), _pair("long-prompt")]
    records[1]["conversations"][-1]["value"] = "word " * 200
    result = _invoke(_write(tmp_path, records), "--check", "--format", "json",
                     "--model-max-length", "200")
    assert result.exit_code == 1, result.output
    report = _report(result)
    assert report["problems"] == {"fully-masked": 1}
    assert report["examples"]["fully-masked"] == ["long-prompt"]


def test_check_on_two_processes_and_ok(tmp_path):
    path = _write(tmp_path, [_pair(f"p{n}") for n in range(2100)])
    result = runner.invoke(app, ["inspect-data", str(path), "--demo", "--image-folder",
                                 str(_images()), "--check", "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "2100" in result.output
    assert "either reply has no supervised token" in " ".join(result.output.split())


@pytest.mark.parametrize(("records", "words", "bad"), [
    ([_pair("p1"), SFT, _pair("p2")], "a supervised record in a file of preference records "
     "(its first record is a preference record)", "sft"),
    ([SFT, _pair("p1"), _pair("p2")], "a preference record in a file of supervised records "
     "(its first record is a supervised record)", "p1"),
])
def test_a_mixed_file_is_a_clear_error_on_the_other_kind(tmp_path, records, words, bad):
    path = _write(tmp_path, records)
    preview = _invoke(path, "--format", "jsonl")
    assert preview.exit_code == 1, preview.output
    lines = [json.loads(line) for line in preview.stdout.splitlines()]
    errors = [line for line in lines if "error" in line]
    assert errors[0]["id"] == bad and words in errors[0]["error"]
    assert errors[0]["kind"] == "bad-field"
    check = _invoke(path, "--check", "--format", "json")
    assert check.exit_code == 1
    report = _report(check)
    assert report["examples"]["bad-field"][0] == bad and words in \
        report["first_messages"]["bad-field"]


def test_preference_flag_decides_over_the_first_record(tmp_path):
    supervised = _pair("first")  # a supervised record (no replies, the prompt answered)
    del supervised["chosen"], supervised["rejected"]
    supervised["conversations"].append({"from": "gpt", "value": "x"})
    path = _write(tmp_path, [supervised, _pair("p1")])
    forced = _invoke(path, "--preference", "--format", "jsonl")
    assert forced.exit_code == 1
    first, second = [json.loads(line) for line in forced.stdout.splitlines()]
    assert first["id"] == "first" and "(--preference)" in first["error"]
    assert second["id"] == "p1" and "chosen" in second
    as_sft = _invoke(_write(tmp_path, [_pair("p1")], "one.json"), "--no-preference",
                     "--format", "jsonl")
    (line,) = [json.loads(x) for x in as_sft.stdout.splitlines()]
    assert "a preference record in a file of supervised records (--no-preference)" \
        in line["error"]


def test_a_broken_first_record_still_reads_as_preference(tmp_path):
    no_rejected = _pair("first")
    del no_rejected["rejected"]
    result = _invoke(_write(tmp_path, [no_rejected, _pair("p1")]), "--format", "jsonl")
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first["id"] == "first" and "no 'rejected' reply" in first["error"]
    assert second["id"] == "p1" and "rejected" in second


def test_the_demo_dpo_split_previews(tmp_path):
    from llava_cli.demo.shapes import generate_split

    path = generate_split(tmp_path / "dpo", 3, 0, "dpo")
    result = runner.invoke(app, ["inspect-data", str(path), "--demo", "--image-folder",
                                 str(path.parent), "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert len(re.findall(r"record 'dpo-\d+' \(#\d\) · preference pair", result.output)) == 2
    assert result.output.count("What shape is it?") == 2

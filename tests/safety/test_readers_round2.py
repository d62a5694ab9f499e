"""Every reader of records follows one rule for image paths and one image check (issues 23
and 25): a relative path starts at the image folder given for the data, else at the data
file's own folder, whatever the working directory; a path that leaves that folder is refused
unless allowed; a FIFO, a device or /dev/stdin is never opened, allowed or not; files and
embedded bytes go through the same check. Also: the QA reader refuses references that can
never match and reads options given as text. No model is loaded here: these are the checks
that run before one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_cli.answers.qa import read_qa_record
from llava_cli.cli import app
from llava_cli.data.images import ImageError, check_image, load_image
from llava_cli.data.sources.embedded import check_image_bytes
from tests.helpers import TINY_LLM, TINY_VISION

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"


def _conversation(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]}


def _pair(rid: str, image: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}], "chosen": "A cat.",
        "rejected": "A dog."}


@pytest.fixture
def layout(tmp_path, assets) -> dict[str, Path]:
    """data/ holds the records and data/pics/ a real non-square picture; the working
    directory is elsewhere/, where no pics/ folder exists."""
    data = tmp_path / "data"
    (data / "pics").mkdir(parents=True)
    shutil.copy(assets / "images" / "cat_tall_500x666.webp", data / "pics" / "cat.webp")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return {"data": data, "elsewhere": elsewhere, "picture": data / "pics" / "cat.webp"}


def _check(path: Path, *args: str):
    result = runner.invoke(app, ["inspect-data", str(path), "--tokenizer", "demo",
                                 "--image-tokens", "4", "--check", "--format", "json",
                                 "--workers", "1", *args])
    assert TRACEBACK not in result.output
    return result, json.loads(result.stdout[result.stdout.index("{"):])


@pytest.mark.parametrize("preference", [False, True], ids=["supervised", "dpo pairs"])
def test_inspect_data_resolves_against_the_data_files_folder(layout, monkeypatch, preference):
    make = _pair if preference else _conversation
    records = layout["data"] / "records.json"
    records.write_text(json.dumps([make("r0", "pics/cat.webp"), make("r1", "pics/cat.webp")]))
    monkeypatch.chdir(layout["elsewhere"])  # the working directory has no pics/ folder
    result, report = _check(records)
    assert result.exit_code == 0, result.output
    assert report["problems"] == {}
    # The image folder given wins over the data file's folder.
    records.write_text(json.dumps([make("r0", "cat.webp")]))
    result, report = _check(records, "--image-folder", str(layout["data"] / "pics"))
    assert result.exit_code == 0 and report["problems"] == {}


def test_the_data_files_folder_confines_too(layout, monkeypatch):
    """Without --image-folder the data file's folder is the one a path may not leave."""
    shutil.copy(layout["picture"], layout["elsewhere"] / "secret.webp")
    records = layout["data"] / "records.json"
    records.write_text(json.dumps([_conversation("up", "../elsewhere/secret.webp"),
                                   _conversation("abs", str(layout["elsewhere"] /
                                                            "secret.webp"))]))
    monkeypatch.chdir(layout["elsewhere"])
    result, report = _check(records)
    assert result.exit_code == 1 and report["problems"] == {"image-outside-folder": 2}
    result, report = _check(records, "--allow-images-outside-folder")
    assert result.exit_code == 0 and report["problems"] == {}


def test_training_and_held_out_builders_follow_the_rule(layout, monkeypatch, tmp_path):
    from llava_cli.config.resolve import resolve_config
    from llava_cli.data.samples import InputSpec
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
    from llava_cli.data.text.tokenizer import add_llava_tokens
    from llava_cli.model.inputs import sample_builder

    held_out = tmp_path / "held"
    held_out.mkdir()
    for folder in (layout["data"], held_out):
        (folder / "r.json").write_text(json.dumps([_conversation("r", "pics/cat.webp")]))
    config = resolve_config("finetune", flags={
        "data_path": str(layout["data"] / "r.json"), "eval_data_path": str(held_out / "r.json"),
        "model_name_or_path": str(TINY_LLM), "output_dir": str(tmp_path / "out")})
    tokenizer = build_demo_tokenizer()
    add_llava_tokens(tokenizer)
    spec = InputSpec(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), lambda size: 4,
                     (0.5, 0.5, 0.5))
    seen = []
    for cwd in (layout["elsewhere"], layout["data"]):
        monkeypatch.chdir(cwd)
        seen.append((sample_builder(config, spec).confined_image_path("r", "pics/cat.webp"),
                     sample_builder(config, spec, held_out=True).image_path("pics/cat.webp")))
    assert seen == [(str(layout["picture"]), str(held_out / "pics" / "cat.webp"))] * 2


def _qa_file(folder: Path, images: list[str]) -> Path:
    path = folder / "qa.json"
    path.write_text(json.dumps([{"id": f"q{n}", "image": image, "question": "What is it?",
                                 "answer": "cat"} for n, image in enumerate(images)]))
    return path


def _pretrain_with_eval_generate(layout, tmp_path, *extra: str):
    return runner.invoke(app, [
        "pretrain", "--data-path", str(layout["data"] / "records.json"),
        "--model-name-or-path", str(TINY_LLM), "--vision-tower", str(TINY_VISION),
        "--tokenizer", "demo", "--random-init", "--max-steps", "1",
        "--output-dir", str(tmp_path / "run"), *extra])


def test_eval_generate_is_checked_whole_before_the_model(layout, tmp_path):
    (layout["data"] / "records.json").write_text(
        json.dumps([_conversation("r0", "pics/cat.webp")]))
    qa = _qa_file(layout["data"], ["pics/cat.webp", "pics/missing.png"])
    result = _pretrain_with_eval_generate(layout, tmp_path, "--eval-generate", str(qa))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [f"llava pretrain: --eval-generate {qa}: record 'q1' (number 1 in {qa}): "
                     f"`image`: image 'pics/missing.png' (resolved to "
                     f"{layout['data'] / 'pics' / 'missing.png'}): file not found"]
    assert not (tmp_path / "run").exists()  # nothing built, nothing written

    wrong = tmp_path / "not-there"
    result = _pretrain_with_eval_generate(layout, tmp_path, "--eval-generate", str(qa),
                                          "--set", f"eval_generate_image_folder={wrong}")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"llava pretrain: --eval-generate {qa}: image folder '{wrong}' is not a folder; give "
        "the folder the records' image paths start from (default: the data file's)")


def test_eval_generate_images_are_confined_as_the_training_records(layout, tmp_path):
    (layout["data"] / "records.json").write_text(
        json.dumps([_conversation("r0", "pics/cat.webp")]))
    qa = _qa_file(layout["data"], ["/etc/passwd"])
    result = _pretrain_with_eval_generate(layout, tmp_path, "--eval-generate", str(qa))
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"llava pretrain: --eval-generate {qa}: record 'q0' (number 0 in {qa}): `image`: image "
        f"'/etc/passwd' resolves to /etc/passwd, outside the image folder {layout['data']}; "
        "allow such paths with --set allow_images_outside_folder=true")


def test_fifos_and_devices_are_never_opened_even_when_allowed(layout):
    fifo = layout["data"] / "pics" / "pipe.png"
    os.mkfifo(fifo)  # no writer: opening it for reading the usual way waits forever
    for path, kind in ((fifo, "a FIFO (named pipe)"), (Path("/dev/null"), "a device")):
        for check in (lambda p: check_image(p), lambda p: check_image(p, full=True),
                      load_image):
            with pytest.raises(ImageError) as info:
                check(path)
            assert info.value.reason == (
                f"is {kind}, not a file: refused (only regular image files are read, even "
                "with images allowed outside the folder)")
    records = layout["data"] / "records.json"
    records.write_text(json.dumps([_conversation("pipe", "pics/pipe.png"),
                                   _conversation("null", "/dev/null")]))
    result, report = _check(records, "--allow-images-outside-folder")
    assert result.exit_code == 1 and report["problems"] == {"bad-image": 2}


def test_one_check_for_image_files_and_bytes(assets, tmp_path):
    names = ["cat_tall_500x666.webp", "chelsea_cat.png", "extreme_ironing.jpg",
             "palette_animated.gif", "ocr_crop_104x27.jpg"]
    for name in names:
        path = assets / "images" / name
        with Image.open(path) as opened:
            expected = opened.size
        data = path.read_bytes()
        assert check_image(path) == check_image(data) == check_image_bytes(data, label=name) \
            == check_image(data, full=True) == expected
    cut = assets / "images" / "extreme_ironing_truncated.jpg"
    reasons = []
    for source in (cut, cut.read_bytes()):
        with pytest.raises(ImageError) as info:
            check_image(source, label="cut.jpg")
        reasons.append(info.value.reason)
    assert reasons[0] == reasons[1] and reasons[0].startswith("cannot be decoded")


@pytest.mark.parametrize(("fields", "message"), [
    ({"answers": [["cat", "kitten"]]}, "`answers[0]` is a list, which can never match an answer"),
    ({"answers": [{"answer": {"text": "cat"}}]},
     "`answers[0].answer` is a dict, which can never match an answer"),
    ({"answers": [{"text": "cat"}]}, "`answers[0]` is an object without `answer`"),
    ({"answer": {"text": "cat"}}, "`answer` is a dict, which can never match an answer"),
    ({"answer": "A", "options": "cat or dog"},
     "`options` is text, but 'cat or dog' is not a lettered option line"),
    ({"answer": "A", "options": 3}, "`options` is int; give a list of options"),
    ({"answer": "A", "options": [["cat"], "dog"]}, "option A of `options` is a list"),
])
def test_references_and_options_that_cannot_be_scored_are_refused(fields, message):
    record = {"id": "x", "question": "What is it?", **fields}
    with pytest.raises(ValueError) as info:
        read_qa_record(record, 4, "qa.json")
    assert str(info.value).startswith(f"record 'x' (number 4 in qa.json): {message}")


def test_options_given_as_text_are_one_lettered_line_each():
    record = {"id": "x", "question": "What is it?", "answer": "B",
              "options": "A. cat\n(B) dog\n\nC) bird"}
    qa = read_qa_record(record, 0, "qa.json")
    assert qa.options == {"A": "cat", "B": "dog", "C": "bird"} and qa.metric == "choice"
    assert qa.question == ("What is it?\nA. cat\nB. dog\nC. bird\n"
                           "Answer with the option's letter from the given choices directly.")
    numbers = read_qa_record({"id": "n", "question": "How many?", "answers": [2, "2", 3.5]},
                             0, "qa.json")
    assert numbers.references == ["2", "2", "3.5"]

"""`llava generate --data` and `llava evaluate` read records through one reader, checked whole
before any model loads (issues 23 and 25), on a tiny model trained and saved here and real
non-square pictures: the QA layout in generate, one path rule from any working directory,
confinement and non-files refused, outputs that are inputs or unwritable refused before the
load, nothing left behind by an interrupted evaluation, and a LoRA run whose base changed
since it was trained refused by every command that would apply it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import tiny_finetune_output

runner = CliRunner()
MAX_NEW = "4"
QUESTION = "What is in the picture?"
CHOICE_PROMPT = ("What animal is it?\nA. dog\nB. cat\n"
                 "Answer with the option's letter from the given choices directly.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A finetune output, a copy of it as a LoRA run's base, and that LoRA run (1 step)."""
    from llava_cli.config.resolve import resolve_config
    from llava_cli.demo.shapes import generate_split
    from llava_cli.train.run import run_training

    root = tmp_path_factory.mktemp("one-reader")
    finetune = tiny_finetune_output(root)
    base = shutil.copytree(finetune, root / "base")
    data = generate_split(root / "lora-data", 4, 0, "lora")
    lora = run_training(resolve_config("lora", flags={
        "data_path": str(data), "model_name_or_path": str(base), "max_steps": 1, "lora_r": 4,
        "lora_alpha": 8, "per_device_train_batch_size": 2, "save_steps": 100, "seed": 7,
        "output_dir": str(root / "lora-run")})).output_dir
    return {"finetune": finetune, "base": base, "lora": lora}


@pytest.fixture
def qa(tmp_path, assets) -> Path:
    """A QA file beside pics/ (real non-square pictures) in every layout: multiple choice,
    several references, a LLaVA conversation, a text-only question."""
    folder = tmp_path / "qa"
    (folder / "pics").mkdir(parents=True)
    shutil.copy(assets / "images" / "cat_tall_500x666.webp", folder / "pics" / "cat.webp")
    shutil.copy(assets / "images" / "extreme_ironing.jpg", folder / "pics" / "iron.jpg")
    records = [
        {"id": "choice", "image": "pics/cat.webp", "question": "What animal is it?",
         "answer": "B", "options": {"A": "dog", "B": "cat"}},
        {"id": "vqa", "image": "pics/iron.jpg", "question": QUESTION,
         "answers": ["ironing", "ironing clothes"]},
        {"id": "llava", "image": "pics/iron.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"},
            {"from": "gpt", "value": "A man ironing."}]},
        {"id": "text", "question": "Say hello.", "answer": "hello"},
    ]
    path = folder / "qa.json"
    path.write_text(json.dumps(records))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_line(result, command: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llava {command}: "), result.stderr
    return lines[0].removeprefix(f"llava {command}: ")


def test_generate_reads_the_qa_layout_as_evaluate_does(runs, qa, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outputs = []
    for cwd in (elsewhere, qa.parent):  # relative image paths start at the QA file's folder
        monkeypatch.chdir(cwd)
        out = tmp_path / f"generated-{len(outputs)}.jsonl"
        result = runner.invoke(app, ["generate", str(runs["finetune"]), "--data", str(qa),
                                     "--output", str(out), "--max-new-tokens", MAX_NEW])
        assert result.exit_code == 0, result.output
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    generated = _lines(tmp_path / "generated-0.jsonl")
    assert [(g["id"], g["prompt"], g["reference"]) for g in generated] == [
        ("choice", CHOICE_PROMPT, "B"), ("vqa", QUESTION, "ironing"),
        ("llava", QUESTION, "A man ironing."), ("text", "Say hello.", "hello")]

    monkeypatch.chdir(elsewhere)
    predictions = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["evaluate", str(runs["finetune"]), "--data", str(qa), "-o",
                                 str(predictions), "--max-new-tokens", MAX_NEW,
                                 "--batch-size", "1", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [p["prediction"] for p in _lines(predictions)] == [g["answer"] for g in generated]


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_paths_that_leave_the_folder_are_refused_before_the_model(qa, tmp_path, command):
    never = tmp_path / "never-loaded"  # no checkpoint at all: the records fail first
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(qa.parent / "pics" / "cat.webp", outside / "secret.jpg")
    out = ["-o" if command == "evaluate" else "--output", str(tmp_path / "out.jsonl")]
    for n, image in enumerate(["../outside/secret.jpg", "/etc/passwd"]):
        qa.write_text(json.dumps([{"id": "fine", "image": "pics/cat.webp", "question": "Q?",
                                   "answer": "a"},
                                  {"id": "bad", "image": image, "question": "Q?", "answer": "a"}]))
        result = runner.invoke(app, [command, str(never), "--data", str(qa), *out])
        resolved = os.path.normpath(qa.parent / image)
        assert _one_line(result, command) == (
            f"record 'bad' (number 1 in {qa}): `image`: image {image!r} resolves to "
            f"{resolved}, outside the image folder {qa.parent}; allow such paths with "
            "--allow-images-outside-folder")
        allowed = runner.invoke(app, [command, str(never), "--data", str(qa), *out,
                                      "--allow-images-outside-folder"])
        if n == 0:  # a picture: allowed, then the missing checkpoint is what fails
            assert "never-loaded" in _one_line(allowed, command)
        else:  # allowed, but not an image
            assert _one_line(allowed, command) == (
                f"record 'bad' (number 1 in {qa}): `image`: image '/etc/passwd': cannot be "
                "decoded: not a recognised image format")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_dev_stdin_is_refused_not_read(qa, tmp_path, command):
    """With the opt-in, `/dev/stdin` (here a pipe nobody writes to) is refused at once; it
    used to wait forever. A separate process, so that a wait could not hang this one."""
    qa.write_text(json.dumps([{"id": "stdin", "image": "/dev/stdin", "question": "Q?",
                               "answer": "a"}]))
    out = "-o" if command == "evaluate" else "--output"
    with subprocess.Popen(
            [sys.executable, "-m", "llava_cli", command, str(tmp_path / "never-loaded"),
             "--data", str(qa), out, str(tmp_path / "o.jsonl"),
             "--allow-images-outside-folder"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True) as process:
        try:
            _, stderr = process.communicate(timeout=600)  # a guard against a hang, not a timing
        finally:
            process.kill()
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        f"llava {command}: record 'stdin' (number 0 in {qa}): `image`: image '/dev/stdin': is "
        "a FIFO (named pipe), not a file: refused (only regular image files are read, even "
        "with images allowed outside the folder)"]


@pytest.mark.parametrize("command", ["evaluate", "generate"])
def test_an_image_folder_that_is_not_there_is_named(qa, tmp_path, command):
    wrong = tmp_path / "not-there"
    result = runner.invoke(app, [command, str(tmp_path / "never-loaded"), "--data", str(qa),
                                 "--image-folder", str(wrong), "--output",
                                 str(tmp_path / "o.jsonl")])
    assert _one_line(result, command) == (
        f"image folder '{wrong}' is not a folder; give the folder the records' image paths "
        "start from (default: the data file's)")


def test_evaluate_checks_every_record_before_the_model(qa, tmp_path):
    records = [{"id": f"q{n}", "image": "pics/cat.webp", "question": "Q?", "answer": "a"}
               for n in range(12)]
    records.append({"id": "q12", "image": "pics/gone.jpg", "question": "Q?", "answer": "a"})
    qa.write_text(json.dumps(records))
    out = tmp_path / "predictions.jsonl"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "never-loaded"), "--data", str(qa),
                                 "-o", str(out)])
    assert _one_line(result, "evaluate") == (
        f"record 'q12' (number 12 in {qa}): `image`: image 'pics/gone.jpg' (resolved to "
        f"{qa.parent / 'pics' / 'gone.jpg'}): file not found")
    assert not out.exists()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def test_outputs_that_are_inputs_or_unwritable_are_refused_before_the_model(runs, qa, tmp_path):
    model, lora = runs["finetune"], runs["lora"]
    before = _digest(model), qa.read_bytes()
    cases = [
        (["evaluate", str(model), "--data", str(qa), "-o", str(model / "model.safetensors")],
         f"lies inside the checkpoint {str(model)!r}"),
        (["evaluate", str(model), "--data", str(qa), "-o", str(qa)], "is the data file"),
        (["evaluate", str(model), "--data", str(qa), "-o", str(qa.parent / "pics" / "cat.webp")],
         f"is the image {str(qa.parent / 'pics' / 'cat.webp')!r}"),
        (["generate", str(model), "--data", str(qa), "--output", str(qa)], "is the data file"),
        (["evaluate", str(lora), "--data", str(qa), "-o", str(runs["base"] / "p.jsonl")],
         f"lies inside the checkpoint {str(runs['base'])!r}"),
        (["evaluate", str(model), "--adapter", str(lora), "--data", str(qa), "-o",
          str(lora / "p.jsonl")], f"lies inside the adapter {str(lora)!r}"),
    ]
    for args, expected in cases:
        command = args[0]
        result = runner.invoke(app, [*args, "--overwrite"])
        assert expected in _one_line(result, command), result.stderr
    assert (_digest(model), qa.read_bytes()) == before
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    result = runner.invoke(app, ["evaluate", str(tmp_path / "never-loaded"), "--data", str(qa),
                                 "-o", str(a_file / "predictions.jsonl")])
    assert _one_line(result, "evaluate") == (
        f"--output {a_file / 'predictions.jsonl'}: {a_file} is a file, not a folder; choose "
        "another location")


def test_an_interrupted_evaluation_leaves_nothing_behind(qa, tmp_path):
    from llava_cli.data.images import ImageLoader
    from llava_cli.generation.qa_evaluation import EvalRequest, evaluate

    class Interrupted:
        """Answers the first batch, then the user presses Ctrl-C."""

        images = ImageLoader()
        calls = 0

        def answer_batch(self, asks, max_new_tokens):
            self.calls += 1
            if self.calls > 1:
                raise KeyboardInterrupt
            return ["B"] * len(asks)

    out = tmp_path / "out" / "predictions.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvalRequest(tmp_path / "never-loaded", qa, out, batch_size=2, progress=False),
                 generator=Interrupted())
    assert not out.parent.exists()  # no partial, no hidden temporary file, no folder


def test_a_lora_run_on_a_changed_base_is_refused(runs, qa, tmp_path):
    from safetensors.torch import load_file, save_file

    base, lora = runs["base"], runs["lora"]
    pristine = shutil.copytree(base, tmp_path / "pristine-base")
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 0.5  # the base retrained or overwritten since
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = lora / "llava_run.json"
    changed = (f"the base {base.resolve()} has changed since the run was trained: its weight "
               f"files differ from the fingerprint in {manifest}, so the adapter would be "
               "applied to other weights; pass the base it was trained on as CHECKPOINT with "
               f"--adapter {lora}, or train the LoRA run again on this base")
    result = runner.invoke(app, ["evaluate", str(lora), "--data", str(qa), "-o",
                                 str(tmp_path / "p.jsonl")])
    assert _one_line(result, "evaluate") == changed
    result = runner.invoke(app, ["generate", str(lora), "--prompt", "Hi"])
    assert _one_line(result, "generate") == changed
    result = runner.invoke(app, ["generate", str(base), "--adapter", str(lora), "--prompt", "Hi",
                                 "--max-new-tokens", MAX_NEW])
    assert _one_line(result, "generate") == (
        f"CHECKPOINT {base.resolve()} is not the base the run was trained on: its weight files "
        f"differ from the fingerprint in {manifest}, so the adapter would be applied to other "
        f"weights; pass the base it was trained on as CHECKPOINT with --adapter {lora}, or "
        "train the LoRA run again on this base")
    # A copy of the base as it was is the base the run was trained on.
    result = runner.invoke(app, ["generate", str(pristine), "--adapter", str(lora),
                                 "--prompt", "Hi", "--max-new-tokens", MAX_NEW])
    assert result.exit_code == 0, result.output

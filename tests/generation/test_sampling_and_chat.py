"""Sampling for users (`llava generate --temperature/--top-p/--top-k/--num-answers/--seed`) and
`llava chat`, on a tiny model trained and saved to disk, then loaded as a user loads it.

Sampled answers equal stock transformers' `generate` drawing from the same seed with the same
settings; a seed repeats them; bad settings are one line before the model loads. The chat is
driven through a pseudo-terminal as a person types: its answers equal the generator's for the
same conversation (several turns through the training template), /image attaches a picture to
the next message, /reset starts over, /exit ends with status 0.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import ROOT, tiny_finetune_output

QUESTION = "What color is the shape?"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return tiny_finetune_output(tmp_path_factory.mktemp("sampling"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for name, size, colour in (("red.png", (41, 29), (220, 40, 40)),
                               ("blue.jpg", (30, 47), (30, 60, 200))):
        Image.new("RGB", size, colour).save(folder / name)
        paths.append(folder / name)
    return paths


def test_sampled_answers_equal_stock_generate_from_the_same_seed(model, pictures):
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_cli.answers.generator import Sampling, clean_answer, generation_kwargs
    from llava_cli.generation.answering_model import load_for_generation

    generator = load_for_generation(model)
    sampling = Sampling(temperature=1.5, top_p=0.9, top_k=20, answers=3, seed=11)
    ours = generator.answers(str(pictures[0]), QUESTION, 6, sampling)
    assert len(ours) == 3
    assert generator.answers(str(pictures[0]), QUESTION, 6, sampling) == ours  # the seed

    stock = LlavaForConditionalGeneration.from_pretrained(model)
    processor = AutoProcessor.from_pretrained(model)
    inputs = generator.inputs([str(pictures[0])], QUESTION)
    kwargs = generation_kwargs(processor, generator.template, 6)
    torch.manual_seed(11)
    with torch.no_grad():
        output = stock.generate(**inputs, **{**kwargs, "do_sample": True, "temperature": 1.5,
                                             "top_p": 0.9, "top_k": 20,
                                             "num_return_sequences": 3})
    texts = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                             skip_special_tokens=True)
    assert ours == [clean_answer(text, generator.template) for text in texts]
    greedy = generator.answers(str(pictures[0]), QUESTION, 6)
    assert greedy == [generator.answer(str(pictures[0]), QUESTION, 6)]


def test_generate_samples_from_the_command_line(model, pictures, tmp_path):
    data = tmp_path / "q.json"
    data.write_text(json.dumps([{"id": "a", "image": str(pictures[0].name),
                                 "question": QUESTION}]))
    (tmp_path / pictures[0].name).write_bytes(pictures[0].read_bytes())
    out = tmp_path / "answers.jsonl"
    args = ["generate", str(model), "--data", str(data), "-o", str(out), "--temperature", "1.0",
            "-n", "2", "--seed", "3", "--max-new-tokens", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = json.loads(out.read_text())
    assert len(line["answers"]) == 2 and line["answer"] == line["answers"][0]
    again = CliRunner().invoke(app, [*args[:5], str(tmp_path / "again.jsonl"), *args[6:]])
    assert again.exit_code == 0
    assert json.loads((tmp_path / "again.jsonl").read_text())["answers"] == line["answers"]


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "3"], "greedy decoding gives one answer; set --temperature above 0"),
    (["--top-p", "0.5"], "--top-p / --top-k shape sampling; set --temperature above 0"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: must be above 0 and at most 1"),
])
def test_bad_sampling_is_one_line_before_the_model(tmp_path, args, message):
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "no-model"), "-p", "hi",
                                      *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def _read_until(fd: int, marker: str, seen: list[str], timeout: float = 240) -> str:
    """Terminal output up to and including the next `marker` (a prompt), as text."""
    buffer = ""
    deadline = time.monotonic() + timeout
    while marker not in buffer:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} from the chat; it printed: {''.join(seen)}"
                                 f"{buffer}")
        ready, _, _ = select.select([fd], [], [], 1)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
            buffer += chunk.replace("\r\n", "\n")
    seen.append(buffer)
    return buffer


def _reply(screen: str) -> str:
    return screen.split("llava> ", 1)[1].rsplit("you> ", 1)[0].strip()


def test_chat_through_a_terminal(model, pictures):
    from llava_cli.answers.generator import Conversation
    from llava_cli.generation.answering_model import load_for_generation

    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llava_cli", "chat", str(model), "--image", str(pictures[0]),
         "--max-new-tokens", "5"], stdin=follower, stdout=follower, stderr=follower,
        cwd=ROOT, env=env, close_fds=True)
    os.close(follower)
    seen: list[str] = []
    try:
        _read_until(leader, "you> ", seen)
        os.write(leader, f"{QUESTION}\n".encode())
        first = _reply(_read_until(leader, "you> ", seen))
        os.write(leader, b"/image " + str(pictures[1]).encode() + b"\n")
        assert "attached to your next message" in _read_until(leader, "you> ", seen)
        os.write(leader, b"And this one?\n")
        second = _reply(_read_until(leader, "you> ", seen))
        os.write(leader, b"/image /no/such/picture.png\n")
        assert "not attached" in _read_until(leader, "you> ", seen)
        os.write(leader, b"/reset\n")
        assert "a new conversation" in _read_until(leader, "you> ", seen)
        os.write(leader, f"{QUESTION}\n".encode())
        after_reset = _reply(_read_until(leader, "you> ", seen))
        os.write(leader, b"/exit\n")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)

    generator = load_for_generation(model)
    talk = Conversation()
    talk.ask(QUESTION, 1)
    assert first == generator.answers(str(pictures[0]), talk, 5)[0]
    assert first == generator.answer(str(pictures[0]), QUESTION, 5)  # one turn: one prompt
    talk.reply(first)
    talk.ask("And this one?", 1)
    assert second == generator.answers([str(p) for p in pictures], talk, 5)[0]
    assert after_reset == generator.answers(None, Conversation([("user", QUESTION, 0)]), 5)[0]

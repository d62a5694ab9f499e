"""The command boundary: every kind of bad input is one named line, an unexpected error is
one line plus the file holding its traceback, Ctrl-C is "interrupted"; never a traceback on
the terminal."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.commands.boundary import guarded, known_error_message

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"


def _app_raising(error: BaseException) -> typer.Typer:
    def command() -> None:
        raise error

    probe = typer.Typer()
    probe.command("probe")(guarded("probe", command))
    probe.command("other")(lambda: None)  # two commands: `probe` is a sub-command
    return probe


def test_an_unexpected_error_is_one_line_and_its_traceback_is_in_a_file():
    result = runner.invoke(_app_raising(TypeError("unsupported operand\nsecond line")),
                           ["probe"])
    assert result.exit_code == 1
    assert TRACEBACK not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("llava probe: unexpected error TypeError: unsupported operand — ")
    saved = Path(line.split("the full traceback is in ")[1].split(" (please")[0])
    text = saved.read_text()
    assert TRACEBACK in text and "TypeError: unsupported operand" in text
    saved.unlink()


@pytest.mark.parametrize(("error", "expected"), [
    (ValueError("data_path is required"), "data_path is required"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y.json"),
     "/x/y.json: No such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device", "/out"),
     "no space left on the device writing /out: free some space"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
    (ValueError("first line of a library's message\n  and its details"),
     "first line of a library's message"),
])
def test_known_errors_are_one_line_exit_2(error, expected):
    result = runner.invoke(_app_raising(error), ["probe"])
    assert result.exit_code == 2 and TRACEBACK not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("llava probe: ") and expected in line


def test_ctrl_c_is_interrupted_exit_130():
    result = runner.invoke(_app_raising(KeyboardInterrupt()), ["probe"])
    assert result.exit_code == 130 and result.stderr.strip() == "llava probe: interrupted"


def test_a_safetensors_error_is_known():
    from safetensors import SafetensorError

    assert known_error_message(SafetensorError("Error while deserializing header")) == (
        "Error while deserializing header")


def test_every_command_is_behind_the_boundary():
    from llava_cli.cli import COMMANDS

    registered = {command.name for command in app.registered_commands}
    assert registered == set(COMMANDS)
    assert all(command.callback.__wrapped__ is COMMANDS[command.name][0]
               for command in app.registered_commands)


def test_generate_output_in_single_prompt_mode_is_an_error(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi",
                                 "--output", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 2
    assert "--output is for batch mode" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--gradient-accumulation-steps", "0"], "gradient_accumulation_steps 0: must be"),
    (["--batch-size", "0"], "per_device_train_batch_size 0: must be"),
    (["--max-steps", "0"], "max_steps 0: give a number of steps"),
    (["--save-steps", "0"], "save_steps 0.0: must be above 0"),
])
def test_impossible_counts_are_named_before_anything_loads(flags, message, tmp_path):
    result = runner.invoke(app, ["finetune", "--model-name-or-path", str(tmp_path),
                                 "--data-path", "x.json", "-o", str(tmp_path / "o"), *flags,
                                 "--print-config"])
    assert result.exit_code == 2 and TRACEBACK not in result.output
    assert message in result.stderr, result.stderr


def test_a_binary_recipe_and_deeply_nested_json_are_named(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["finetune", str(recipe), "--print-config"])
    assert result.exit_code == 2 and TRACEBACK not in result.output
    assert f"recipe {str(recipe)!r} is not a text file" in result.stderr
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    result = runner.invoke(app, ["inspect-data", str(nested), "--tokenizer", "demo",
                                 "--check"])
    assert result.exit_code == 2 and TRACEBACK not in result.output, result.output
    assert json.dumps(str(nested))[1:-1] in result.stderr or str(nested) in result.stderr

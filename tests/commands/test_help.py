"""Every command's --help, read as a person would at 80 columns: every option has help text
and states its default (or that it is required), and no line or name is cut."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from llava_cli.cli import COMMANDS, app

OPTION = re.compile(r"^  (-{1,2}[a-z])")


def _option_blocks(text: str) -> list[tuple[str, str]]:
    """(names, help text) of every option in the sections after the description."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    first_heading = next(i for i, line in enumerate(lines) if re.match(r"^[A-Z].*:$", line))
    for line in lines[first_heading:]:
        if OPTION.match(line):
            names, *first = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            blocks.append([names, *first])
        elif blocks and blocks[-1] and line.startswith("     "):
            blocks[-1].append(line.strip())
        else:
            blocks.append([])  # a heading, a blank line or an argument ends an option
    return [(block[0], " ".join(block[1:])) for block in blocks if block]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_and_its_default(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=80,
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    assert "…" not in result.output
    for names, help_text in _option_blocks(result.output):
        if "--help" in names:
            continue
        assert help_text.strip(), f"{command} {names}: no help text"
        text = help_text.lower()
        assert "default" in text or "[required]" in text, f"{command} {names}: no default"

"""An original LLaVA / InternVL training script (`deepspeed llava/train/train_mem.py --…`)
read as text — never executed — and written out as one of our recipes.

`script_arguments` finds the training command (continuation lines joined, comments dropped,
quotes removed by `shlex`) and returns the words after its `train*.py`; `$VARS` stay as they
are, each with a warning. `recipe_from_arguments` reads those words the way `llava pretrain
|finetune|lora` reads them on the command line (`config.original_args`, `config.resolve`)
and writes the resulting keys as YAML.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from llava_cli.config.original_args import (
    accepted_notes,
    is_true,
    original_names,
    split_original_pairs,
)
from llava_cli.config.run_config import ConfigError

# Shell words that end the training command's arguments (a pipe into tee, a redirect, …).
_COMMAND_ENDS = re.compile(r"^(\||\|\||&&|;|&|\d*>>?.*|<.*)$")
_TRAIN_ENTRY = re.compile(r"(^|/)train[\w-]*\.py$|^llava\.train\.[\w.]+$")


@dataclass
class ScriptArguments:
    """The training command's arguments, what launched it, and what could not be read."""

    arguments: list[str]
    launcher: str
    warnings: list[str] = field(default_factory=list)


def script_arguments(text: str, where: str = "the script") -> ScriptArguments:
    """The arguments of the script's training command (the first line running a
    `train*.py` file or a `llava.train.*` module)."""
    joined = re.sub(r"\\\r?\n", " ", text)
    for line in joined.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError as err:  # an unclosed quote: not a line we can read
            raise ConfigError(f"{where}: cannot read the line {line.strip()[:60]!r} ({err}); "
                              "fix its quotes") from None
        entry = next((i for i, w in enumerate(words) if _TRAIN_ENTRY.search(w)), None)
        if entry is None:
            continue
        arguments = []
        for word in words[entry + 1:]:
            if _COMMAND_ENDS.match(word):
                break
            arguments.append(word)
        warnings = [f"{word!r} is a shell variable, kept as written: give its value in the "
                    "recipe" for word in arguments if "$" in word]
        return ScriptArguments(arguments, " ".join(words[: entry + 1]), warnings)
    raise ConfigError(f"{where}: no training command found (a line running "
                      "llava/train/train_mem.py, train.py or another train*.py); give the script "
                      "that launches training")


def stage_of(pairs: list[tuple[str, str]]) -> str:
    """The command a script's arguments mean: `pretrain` when only the projector trains,
    `lora` with LoRA, else `finetune`."""
    given = dict(pairs)
    if is_true(given.get("lora_enable", "false")):
        return "lora"
    if is_true(given.get("tune_mm_mlp_adapter", "false")):
        return "pretrain"
    return "finetune"


def recipe_from_arguments(script: ScriptArguments, stage: str | None = None,
                          source: str = "the script") -> tuple[str, str]:
    """(stage, YAML recipe) for the script's arguments; ConfigError naming every argument
    nothing knows, or a value we refuse."""
    from llava_cli.config.resolve import place_keys

    try:
        pairs = [(k, v) for k, v in split_original_pairs(script.arguments) if k != "local_rank"]
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    stage = stage or stage_of(pairs)
    notes = accepted_notes()
    literal = {k: v for k, v in pairs if "$" in v}  # shell variables: kept as written
    _refuse_note_values([(k, v) for k, v in pairs if k in notes and k not in literal], source)
    placed = place_keys({k: v for k, v in pairs if k not in literal and k not in notes},
                        f"{source}'s arguments")
    keys: dict[str, Any] = {k: v for k, v in placed.items() if k != "training_args"}
    keys.update(placed.get("training_args", {}))
    keys.update(literal)
    lines = [f"# A recipe from {source} ({script.launcher} …), read by llava recipe-from-script.",
             f"# Run: llava {stage} THIS.yaml"]
    lines += [f"# {w}" for w in script.warnings]
    lines += [f"# --{k} {v}: accepted, no effect: {notes[k]}" for k, v in pairs if k in notes]
    body = yaml.safe_dump(_plain(keys), sort_keys=False, allow_unicode=True, width=100)
    return stage, "\n".join(lines) + "\n" + body


def _refuse_note_values(pairs: list[tuple[str, str]], source: str) -> None:
    """A no-op name still checks its value (`mm_patch_merge_type spatial_unpad` is refused on
    the command line, so it must not become a harmless comment in the recipe)."""
    names = original_names()
    for key, value in pairs:
        try:
            names[key](value)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None


def _plain(keys: dict[str, Any]) -> dict[str, Any]:
    """Enum members (IntervalStrategy.NO) as their values, so safe_dump can write them."""
    return {k: getattr(v, "value", v) for k, v in keys.items()}

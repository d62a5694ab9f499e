"""Every declared setting, seen one way: the views the rest of the program derives from the
one declaration (`RunConfig`'s annotated fields and `TRAINER_SETTINGS`).

- `declared_settings()`: each setting with its type, its default for a command, its help,
  panel, choices and command-line names — what `commands.train` builds options from;
- `stage_layer(command)`: the values a command starts from, the bottom layer of
  `config.resolve` (what the stage presets were);
- `trainer_defaults()`: our defaults for the Trainer's fields, for a configuration built
  without a command (`train.arguments`);
- `settings_reference()`: `docs/settings.md`, generated (a test fails when it is stale).

Imports nothing heavy: transformers' fields are read from its source (`config.trainer_fields`).
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any

from llava_cli.config.run_config import TRAINER_SETTINGS, RunConfig
from llava_cli.config.setting import PANELS, STAGES, Setting
from llava_cli.config.trainer_fields import NO_DEFAULT, trainer_fields


@dataclass(frozen=True)
class DeclaredSetting:
    """One setting as every consumer sees it."""

    name: str
    annotation: Any
    default: Any  # before any stage: ours, else transformers' (NO_DEFAULT: computed there)
    setting: Setting
    trainer: bool  # a TrainingArguments field (kept in RunConfig.training_args)

    def default_for(self, command: str) -> Any:
        """The value `command` starts from when nothing sets it."""
        return self.setting.default_for(command, self.default)

    @property
    def option_names(self) -> tuple[str, ...]:
        """`--name-with-dashes` and the declared aliases."""
        return (f"--{self.name.replace('_', '-')}", *self.setting.aliases)

    @property
    def is_switch(self) -> bool:
        return _plain(self.annotation) is bool

    @property
    def choices(self) -> tuple[str, ...] | None:
        """The values a closed set allows, as text (Literal or enum types)."""
        kind = _plain(self.annotation)
        if typing.get_origin(kind) is typing.Literal:
            return tuple(str(choice) for choice in typing.get_args(kind))
        if isinstance(kind, type) and issubclass(kind, enum.Enum):
            return tuple(str(member.value) for member in kind)
        return None

    @property
    def value_type(self) -> type:
        """The Python type a command-line value is read as (text for closed sets: the
        configuration reads it by the field's type)."""
        kind = _plain(self.annotation)
        return kind if kind in (int, float, bool) else str

    def shown_default(self, command: str) -> str:
        """The default as `--help` and the settings reference word it."""
        value = self.default_for(command)
        computed = self.trainer and TRAINER_SETTINGS[self.name][1] is None \
            and command not in self.setting.stages and self.setting.default_text
        if value is None or value is NO_DEFAULT or computed:
            return self.setting.default_text or "none"
        return format_value(value)


def _plain(annotation: Any) -> Any:
    """`X | None` → X (the option's own type)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def format_value(value: Any) -> str:
    """`2e-05` as 2e-5, `True` as true, lists as YAML writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:g}"
        return text.replace("e-0", "e-").replace("e+0", "e+")
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


@functools.cache
def declared_settings() -> tuple[DeclaredSetting, ...]:
    """Every declared setting: `RunConfig`'s annotated fields, then `TRAINER_SETTINGS` (read
    once per process: every command's options at start-up come from here)."""
    out = []
    for name, field in RunConfig.model_fields.items():
        setting = next((m for m in field.metadata if isinstance(m, Setting)), None)
        if setting is not None:
            out.append(DeclaredSetting(name, field.annotation, field.default, setting, False))
    fields = trainer_fields()
    for name, (setting, ours) in TRAINER_SETTINGS.items():
        theirs = fields[name]
        out.append(DeclaredSetting(name, theirs.annotation,
                                   theirs.default if ours is None else ours, setting, True))
    return tuple(out)


def stage_layer(command: str) -> dict[str, Any]:
    """What `command` means before any recipe or flag: the declared stage values of our
    fields, and our defaults and stage values of the Trainer's (under `training_args`)."""
    layer: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for declared in declared_settings():
        if declared.trainer:
            ours = TRAINER_SETTINGS[declared.name][1]
            if command in declared.setting.stages or ours is not None:
                trainer[declared.name] = declared.default_for(command)
        elif command in declared.setting.stages:
            layer[declared.name] = declared.setting.stages[command]
    if trainer and command in STAGES:
        layer["training_args"] = trainer
    return layer


def trainer_defaults() -> dict[str, Any]:
    """Our defaults of the Trainer's fields where they differ from transformers' (any
    command), for a configuration that did not come through `config.resolve`."""
    return {name: ours for name, (_, ours) in TRAINER_SETTINGS.items() if ours is not None}


def settings_reference() -> str:
    """`docs/settings.md`: every setting by panel, with its default per training command."""
    lines = ["# Settings reference", "",
             "Generated from the one declaration of settings (`llava_cli/config/run_config.py`) "
             "by `python -m llava_cli.config.declared > docs/settings.md`; "
             "`tests/config/test_declared.py` fails when this file is stale.", "",
             "Every setting can be given in a recipe (`key: value`), with `--set key=value`, "
             "or — where it has one — with its option (`--key-name`); flags beat `--set`, "
             "which beats the recipe. Any other `transformers.TrainingArguments` field is "
             "accepted in a recipe or with `--set`, and the original LLaVA / InternVL "
             "argument names are read as theirs (docs/from-original-llava.md).", ""]
    settings = declared_settings()
    for panel in PANELS:
        rows = [s for s in settings if s.setting.panel == panel]
        if not rows:
            continue
        lines += [f"## {panel}", "", "| setting | option | " + " | ".join(STAGES)
                  + " | what it is |", "|---|---|" + "---|" * len(STAGES) + "---|"]
        for s in rows:
            option = ", ".join(f"`{n}`" for n in s.option_names) if s.setting.flag else \
                "recipe / `--set`"
            defaults = [f"`{s.shown_default(c)}`" if c in s.setting.commands else "—"
                        for c in STAGES]
            choices = f" One of: {', '.join(s.choices)}." if s.choices and \
                len(s.choices) <= 8 else ""
            lines.append(f"| `{s.name}` | {option} | " + " | ".join(defaults)
                         + f" | {s.setting.help}{choices} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_reference(), end="")

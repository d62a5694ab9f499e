"""Options every command shares, and turning them into one resolved configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from llava_cli.config.declared import DeclaredSetting
    from llava_cli.config.run_config import RunConfig

CONFIG_PANEL = "Configuration"

Recipe = Annotated[Path | None, typer.Argument(
    help="Recipe YAML (any configuration key; --set and flags override it).",
    show_default=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", rich_help_panel=CONFIG_PANEL,
    help="Override any configuration key or transformers.TrainingArguments field.")]
PrintConfig = Annotated[bool, typer.Option(
    "--print-config", rich_help_panel=CONFIG_PANEL,
    help="Print the resolved configuration and exit.")]


def setting_option(declared: DeclaredSetting, command: str, offered: bool = True) -> Any:
    """The Typer option of a declared setting, as a parameter annotation: its names, help
    ending with `command`'s default, panel, and choices (an Enum: Typer lists its values).
    `None` is its default: "not given", so a recipe or `--set` below it still counts."""
    import enum

    help_text = f"{declared.setting.help} [default: {declared.shown_default(command)}]"
    choices = declared.choices
    if choices and len(choices) > 4:
        help_text += f" [choices: {', '.join(choices)}]"
    names = declared.option_names
    if declared.is_switch:
        dashed = names[0][2:]
        names = (f"--{dashed}/--no-{dashed}", *names[1:])
    option = typer.Option(
        *names, help=help_text, rich_help_panel=declared.setting.panel, show_default=False,
        hidden=not offered, metavar=_metavar(declared, choices))
    kind: Any = declared.value_type
    if choices and not declared.is_switch:
        kind = enum.Enum(declared.name, {choice: choice for choice in choices}, type=str)
    return Annotated[kind | None, option]


def option_for(name: str, command: str) -> Any:
    """`setting_option` of the declared setting `name` (for commands with a few of them)."""
    from llava_cli.config.declared import declared_settings

    declared = next(s for s in declared_settings() if s.name == name)
    return setting_option(declared, command)


def given_values(given: dict[str, Any]) -> dict[str, Any]:
    """Option values as the configuration reads them (a choice's Enum member as its text)."""
    import enum

    return {k: v.value if isinstance(v, enum.Enum) else v for k, v in given.items()}


def _metavar(declared: DeclaredSetting, choices: tuple[str, ...] | None) -> str | None:
    """N, X, TEXT, or the choices (a long list of them is named in the help instead)."""
    if declared.is_switch:
        return None
    if choices:
        return "[" + "|".join(choices) + "]" if len(choices) <= 4 else "NAME"
    return {int: "N", float: "X"}.get(declared.value_type, "TEXT")


def config_or_exit(command: str, recipe: Path | None, sets: list[str] | None,
                   flags: dict[str, Any]) -> RunConfig:
    """Resolve the configuration; a problem ends the command with status 2 and its message."""
    from llava_cli.config.resolve import resolve_config
    from llava_cli.config.run_config import ConfigError

    try:
        return resolve_config(command, recipe, sets, flags)
    except ConfigError as err:
        typer.echo(f"llava {command}: {err}", err=True)
        raise typer.Exit(2) from None


def show_config(config: RunConfig, command: str, trainer: bool = False) -> None:
    """Print the resolved configuration as YAML; with `trainer`, also what the run passes to
    TrainingArguments (our defaults included), checked by the same mapping a run uses — so a
    configuration it prints is one a run accepts."""
    typer.echo(config.to_yaml(), nl=False)
    if not trainer:
        return
    import torch
    import yaml

    from llava_cli.train.arguments import argument_values, default_workers

    try:
        values = argument_values(config, config.output_dir or ".",
                                 on_cpu=not torch.cuda.is_available(), workers=default_workers())
    except ValueError as err:
        typer.echo(f"llava {command}: {err}", err=True)
        raise typer.Exit(2) from None
    shown = {k: v.value if hasattr(v, "value") else v for k, v in sorted(values.items())}
    typer.echo(yaml.safe_dump({"trainer_arguments": shown}, sort_keys=False), nl=False)


def quiet_libraries() -> None:
    """Before a command loads the libraries: no tqdm bars from transformers between our Rich
    output ("Loading weights", "Writing model shards"), and on a machine without an
    accelerator no DeepSpeed line guessing at one (accelerate imports DeepSpeed when it is
    installed, and its detection warns on every command)."""
    import os

    import torch
    from transformers.utils import logging as hf_logging

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and not accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    hf_logging.disable_progress_bar()

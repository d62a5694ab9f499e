"""Options every command shares, and turning them into one resolved configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
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


def show_config(config: RunConfig) -> None:
    """Print the resolved configuration as YAML."""
    typer.echo(config.to_yaml(), nl=False)

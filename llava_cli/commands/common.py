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

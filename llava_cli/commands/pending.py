"""Commands whose implementation has not landed yet: they say so and exit 2, nothing fake."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

NOT_IMPLEMENTED_EXIT = 2


def not_implemented(command: str) -> None:
    """Tell the user plainly and exit with status 2."""
    typer.echo(f"llava {command}: not implemented yet", err=True)
    raise typer.Exit(NOT_IMPLEMENTED_EXIT)


def merge_lora(
    run_dir: Annotated[Path, typer.Argument(
        help="A LoRA run directory (or a checkpoint-N in it).")],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", help="Where to write the model.")],
) -> None:
    """Merge a LoRA run into its base model and save a standalone checkpoint."""
    not_implemented("merge-lora")


def export_projector(
    checkpoint: Annotated[Path, typer.Argument(help="A run directory or LLaVA checkpoint.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The projector file to write.")],
) -> None:
    """Export the projector weights (LLaVA mm_projector.bin or safetensors)."""
    not_implemented("export-projector")

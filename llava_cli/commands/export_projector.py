"""`llava export-projector CHECKPOINT --output FILE`: options → `llava_cli.export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_projector(
    checkpoint: Annotated[Path, typer.Argument(
        help="A pretrain, finetune, merged or LoRA output, an HF-layout LLaVA checkpoint, or a "
        "projector file.", show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="The projector file to write.", show_default=False)],
    output_format: Annotated[str | None, typer.Option(
        "--format", help="llava (mm_projector.bin) | safetensors (+ FILE.json). Default: "
        "from the extension (.bin/.pt → llava, .safetensors → safetensors).",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output file.")] = False,
) -> None:
    """Export the projector weights (LLaVA mm_projector.bin or safetensors).

    Only the projector tensors are read, never the whole model.
    The file loads back bit-identical with --pretrained-projector FILE, and in LLaVA's code.
    """
    from llava_cli.artifacts.export import export_projector as run

    result = run(checkpoint, output, output_format, overwrite=overwrite)
    typer.echo(f"projector from {result.source} written to {result.output} "
               f"({result.format}: {', '.join(result.keys)})")
    if result.sidecar:
        typer.echo(f"description: {result.sidecar}")

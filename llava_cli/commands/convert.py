"""`llava convert SOURCE -o OUT [--to ours|llava]`: options → one `llava_cli.convert` call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def convert(
    source: Annotated[Path, typer.Argument(
        help="--to ours: an original LLaVA checkpoint (full, projector-only, or a LoRA run). "
        "--to llava: one of our full or LoRA outputs.", show_default=False)],
    output_dir: Annotated[Path, typer.Option(
        "--output-dir", "-o", help="Where to write the converted checkpoint.",
        show_default=False)],
    to: Annotated[str, typer.Option(
        "--to", help="ours (HF-native, stock transformers) | llava (the original's layout).")
    ] = "ours",
    vision_tower: Annotated[str | None, typer.Option(
        help="--to ours: the CLIP folder mm_vision_tower names (default: that name, as a "
        "path or next to the checkpoint; never the hub).", show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        help="--to ours: the base LLM folder a projector or LoRA run was trained on.",
        show_default=False)] = None,
    template: Annotated[str, typer.Option(
        help="--to ours: the conversation template the checkpoint was trained with (the "
        "original does not record it).")] = "v1",
    tower_name: Annotated[str | None, typer.Option(
        help="--to llava: what to write as mm_vision_tower (default: the tower folder "
        "written beside the weights, OUT/vision_tower, as an absolute path).",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Write into a non-empty output directory.")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify/--no-verify", help="Compare the result's logits with the source's, each "
        "read in its own layout (default: on).")] = True,
) -> None:
    """Convert between the original LLaVA layout (haotian-liu/LLaVA) and ours.

    --to ours: the result loads with stock transformers and vLLM (a LoRA run is merged
    into --base; a projector-only run becomes a pretrain output). --to llava: the original's
    `load_pretrained_model` reads the result (its folder name must contain "llava", and
    "lora" for a LoRA run given with --model-base). Verified by logits both ways.
    """
    from llava_cli.commands.common import quiet_libraries

    quiet_libraries()
    # Bad input exits 2, a failed check 1 (nothing written): the command boundary.
    _convert(source, output_dir, to, vision_tower, base, template, tower_name, overwrite,
             verify)


def _convert(source: Path, output_dir: Path, to: str, vision_tower: str | None,
             base: str | None, template: str, tower_name: str | None, overwrite: bool,
             verify: bool) -> None:
    if to == "ours":
        from llava_cli.convert.from_original import convert_original, describe

        result = convert_original(source, output_dir, vision_tower=vision_tower, base=base,
                                  template=template, overwrite=overwrite, verify=verify,
                                  log=typer.echo)
    elif to == "llava":
        from llava_cli.convert.to_original import convert_to_original, describe

        result = convert_to_original(source, output_dir, tower_name=tower_name,
                                     overwrite=overwrite, verify=verify, log=typer.echo)
    else:
        raise ValueError(f"--to {to!r}: use ours or llava")
    typer.echo(describe(result))

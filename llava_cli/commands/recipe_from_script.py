"""`llava recipe-from-script SCRIPT.sh > recipe.yaml`: options → `config.original_script`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def recipe_from_script(
    script: Annotated[Path, typer.Argument(
        help="An original LLaVA or InternVL training script (e.g. scripts/v1_5/finetune.sh).",
        show_default=False)],
    stage: Annotated[str | None, typer.Option(
        "--stage", help="pretrain | finetune | lora. Default: from the arguments "
        "(tune_mm_mlp_adapter → pretrain, lora_enable → lora, else finetune).",
        show_default=False)] = None,
) -> None:
    """Print the recipe YAML that the script's train.py arguments mean (the script is read,
    never run).

    The same arguments also run as written: llava finetune --model_name_or_path M
    --bf16 True (and the rest of the script).
    """
    from llava_cli.config.original_script import recipe_from_arguments, script_arguments

    if stage not in (None, "pretrain", "finetune", "lora"):
        raise typer.BadParameter(f"{stage!r}: choose pretrain, finetune or lora",
                                 param_hint="--stage")
    try:
        text = script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:  # the boundary prints it: exit 2
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ValueError(f"cannot read {str(script)!r}: {reason}") from None
    arguments = script_arguments(text, str(script))
    chosen, recipe = recipe_from_arguments(arguments, stage, str(script))
    for warning in arguments.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(recipe, nl=False)
    typer.echo(f"recipe for llava {chosen} written", err=True)

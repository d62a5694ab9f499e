"""`llava inspect-data DATA`: preview label masks of records, or check a whole dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llava_cli.commands.common import (
    PrintConfig,
    SetOption,
    config_or_exit,
    given_values,
    option_for,
    show_config,
)

VIEW = "What to show"
DATA = "Data and tokenizer"
COMMAND = "inspect-data"

# The run settings inspect-data reads, declared once (`config.run_config`) as training's are.
ImageFolder = option_for("image_folder", COMMAND)
Tokenizer = option_for("tokenizer", COMMAND)
Template = option_for("template", COMMAND)
Tokenization = option_for("tokenization", COMMAND)
ModelMaxLength = option_for("model_max_length", COMMAND)
ImageAspectRatio = option_for("image_aspect_ratio", COMMAND)
AllowOutside = option_for("allow_images_outside_folder", COMMAND)


def inspect_data(
    data: Annotated[Path | None, typer.Argument(
        help="LLaVA .json (list) or .jsonl file, or a mix file (docs/data.md).",
        show_default=False)] = None,
    recipe: Annotated[Path | None, typer.Option(
        "--recipe", help="Take data/template/tokenizer settings from a recipe YAML.",
        rich_help_panel=DATA)] = None,
    set_: SetOption = None,
    print_config: PrintConfig = False,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Use the bundled sample records and the built-in demo tokenizer.",
        rich_help_panel=DATA)] = False,
    image_folder: ImageFolder = None,
    tokenizer: Tokenizer = None,
    model: Annotated[str | None, typer.Option(
        help="A LLaVA model folder: its tokenizer and image-token count.",
        rich_help_panel=DATA)] = None,
    template: Template = None,
    tokenization: Tokenization = None,
    model_max_length: ModelMaxLength = None,
    image_aspect_ratio: ImageAspectRatio = None,
    image_tokens: Annotated[int | None, typer.Option(
        help="Tokens per image (default: from --model, else 576).", rich_help_panel=DATA)] = None,
    index: Annotated[int | None, typer.Option(
        "--index", help="Show record number N (0-based).", rich_help_panel=VIEW)] = None,
    record_id: Annotated[str | None, typer.Option(
        "--id", help="Show the record with this id.", rich_help_panel=VIEW)] = None,
    limit: Annotated[int | None, typer.Option(
        help="Show the first N records (default 3; jsonl: all).", rich_help_panel=VIEW)] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="Scan every record and report problems (exit 1 if any).",
        rich_help_panel=VIEW)] = False,
    full_decode: Annotated[bool, typer.Option(
        "--full-decode", help="--check decodes every image (default: header, pixel limit and "
        "the file's end).", rich_help_panel=VIEW)] = False,
    allow_images_outside_folder: AllowOutside = None,
    output_format: Annotated[str, typer.Option(
        "--format", help="rich | json | jsonl.", rich_help_panel=VIEW)] = "rich",
    show_ids: Annotated[bool, typer.Option(
        "--show-ids", help="Also list every token id and label.", rich_help_panel=VIEW)] = False,
    workers: Annotated[int | None, typer.Option(
        help="Processes for --check (default: all cores).", rich_help_panel=VIEW)] = None,
    preference: Annotated[bool | None, typer.Option(
        "--preference/--no-preference", help="Read the records as preference pairs (llava "
        "dpo's data) or as supervised ones (default: as the file's first record is).",
        show_default=False, rich_help_panel=DATA)] = None,
) -> None:
    """Preview label masks (supervised text highlighted) or --check a whole dataset."""
    from llava_cli.inspect.inspection import DEMO_IMAGE_TOKENS, InspectRequest, demo_data
    from llava_cli.inspect.inspection import inspect_data as run

    if output_format not in ("rich", "json", "jsonl"):
        raise typer.BadParameter("choose rich, json or jsonl", param_hint="--format")
    flags = {"data_path": str(data) if data else None, "image_folder": image_folder,
             "tokenizer": tokenizer, "model_name_or_path": model, "template": template,
             "tokenization": tokenization, "model_max_length": model_max_length,
             "image_aspect_ratio": image_aspect_ratio,
             # Off means "not given": a recipe or --set may still turn them on.
             "image_check": "full" if full_decode else None,
             "allow_images_outside_folder": allow_images_outside_folder}
    flags = given_values(flags)
    if demo:
        records, folder = demo_data()
        flags = {"data_path": records, "image_folder": folder, "tokenizer": "demo",
                 **{k: v for k, v in flags.items() if v is not None}}
        image_tokens = image_tokens or DEMO_IMAGE_TOKENS
    config = config_or_exit("inspect-data", recipe, set_, flags)
    if print_config:
        show_config(config, "inspect-data")
        return
    request = InspectRequest(index, record_id, limit, check, output_format,  # type: ignore[arg-type]
                             show_ids, workers, image_tokens, preference)
    raise typer.Exit(run(config, request))  # 1: --check found problems

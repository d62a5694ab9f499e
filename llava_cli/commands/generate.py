"""`llava generate`: answer one prompt (streamed), or every record of a LLaVA file (JSON lines).
The generation options declared here are `llava evaluate`'s too."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    pass

SINGLE = "Single prompt"
BATCH = "Batch (a LLaVA .json/.jsonl file)"


# The options `generate` and `evaluate` share, declared once.
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens to generate.", min=1)]
Overwrite = Annotated[bool, typer.Option("--overwrite",
                                         help="Replace an existing --output file.")]
Adapter = Annotated[Path | None, typer.Option(
    "--adapter", help="A LoRA run directory to apply to CHECKPOINT.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"llava generate: {message}", err=True)
    return typer.Exit(code)


def generate(
    checkpoint: Annotated[Path, typer.Argument(
        help="A finetune output, a LoRA run (its base is loaded from the manifest) or any "
        "LLaVA checkpoint.", show_default=False)],
    image: Annotated[Path | None, typer.Option(
        "--image", help="The image to ask about (leave out for a text-only prompt).",
        rich_help_panel=SINGLE)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="The question.", rich_help_panel=SINGLE)] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Answer the first human turn of every record.",
        rich_help_panel=BATCH)] = None,
    image_folder: Annotated[Path | None, typer.Option(
        "--image-folder", help="Where the records' images are (default: the data file's "
        "folder).", rich_help_panel=BATCH)] = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="JSON lines: id, prompt, answer, reference.",
        rich_help_panel=BATCH)] = None,
    max_new_tokens: MaxNewTokens = 64,
    overwrite: Overwrite = False,
    adapter: Adapter = None,
) -> None:
    """Answer a prompt with a trained model (greedy decoding, the training prompt format)."""
    if data is None and prompt is None:
        raise _fail("pass --prompt TEXT (single mode) or --data FILE --output OUT (batch mode)", 2)
    if data is not None and (prompt is not None or image is not None):
        raise _fail("--data (batch mode) cannot be combined with --prompt/--image", 2)
    if data is not None and output is None:
        raise _fail("batch mode needs --output OUT.jsonl", 2)
    if data is None and output is not None:
        raise _fail("--output is for batch mode (--data FILE); a single answer is printed "
                    "(redirect it to keep it)", 2)
    if output is not None:
        from llava_cli.artifacts.output_dir import refuse_existing_file

        try:
            refuse_existing_file(output, overwrite)
        except ValueError as err:
            raise _fail(str(err), 2) from None
    for path in (image, data):
        if path is not None and not path.is_file():
            raise _fail(f"{path}: no such file", 2)
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.generation.answering_model import load_for_generation
    from llava_cli.generation.batch import answer_records

    quiet_libraries()
    try:
        generator = load_for_generation(checkpoint, adapter)
        if data is not None:
            count = answer_records(generator, data, output, image_folder, max_new_tokens)
            typer.echo(f"wrote {count} answers to {output}", err=True)
            return
        generator.answer(image, prompt, max_new_tokens, stream=True)  # None: text only
    except ValueError as err:  # our load/record/image errors are ValueErrors with a message
        raise _fail(str(err), 1) from None

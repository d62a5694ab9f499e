"""`llava generate`: answer one prompt (streamed), or every record of a LLaVA file (JSON lines);
`llava evaluate`: answer a QA file, score the answers, write the predictions (one module: the
two share the generation options, and the commands folder holds ten)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from llava_cli.generation.evaluate import EvalReport

SINGLE = "Single prompt"
BATCH = "Batch (a LLaVA .json/.jsonl file)"
SCORING = "Scoring"


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
    from llava_cli.generation.batch import answer_records
    from llava_cli.generation.load import load_for_generation

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



class Metric(str, Enum):
    """--metric: one scoring for every record instead of the per-record choice."""

    exact = "exact"
    vqa = "vqa"
    choice = "choice"


class Format(str, Enum):
    """--format: how the metrics are printed."""

    table = "table"
    json = "json"


def evaluate(
    checkpoint: Annotated[Path, typer.Argument(
        help="A finetune output, a LoRA run (its base is loaded from the manifest) or any "
        "LLaVA checkpoint.", show_default=False)],
    data: Annotated[Path, typer.Option(
        "--data", help="The QA file (.json/.jsonl): LLaVA records (conversations) or "
        "question/answer(s)/image records, multiple choice with options.",
        show_default=False)],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Predictions, JSON lines: id, prediction, score, references, "
        "group, metric.", show_default=False)],
    image_folder: Annotated[Path | None, typer.Option(
        "--image-folder", help="Where the records' images are (default: the data file's "
        "folder).")] = None,
    metric: Annotated[Metric | None, typer.Option(
        "--metric", help="Score every record this way (default per record: choice with "
        "options, vqa with several references, else exact).", rich_help_panel=SCORING)] = None,
    group_by: Annotated[str | None, typer.Option(
        "--group-by", metavar="FIELD", help="Accuracy per value of this record field "
        "(default: question_type, when the records have it).", rich_help_panel=SCORING)] = None,
    vqa_simple: Annotated[bool, typer.Option(
        "--vqa-simple", help="VQA soft accuracy as min(matches/3, 1) instead of the official "
        "average over the references left out in turn.", rich_help_panel=SCORING)] = False,
    output_format: Annotated[Format, typer.Option(
        "--format", help="table: a Rich table; json: the metrics as one JSON object.")]
        = Format.table,
    max_new_tokens: MaxNewTokens = 64,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Questions per generate call (left-padded: the same "
        "answers as one at a time).")] = 8,
    overwrite: Overwrite = False,
    adapter: Adapter = None,
) -> None:
    """Answer every question of a QA file (greedy, the saved chat template) and score the
    answers: exact match, VQA soft accuracy, multiple-choice letters; overall and per group."""
    from llava_cli.artifacts.output_dir import refuse_existing_file

    if not data.is_file():
        raise ValueError(f"--data {data}: no such file; give the QA file (.json or .jsonl)")
    refuse_existing_file(output, overwrite)
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.generation.evaluate import EvalRequest
    from llava_cli.generation.evaluate import evaluate as run_evaluation

    quiet_libraries()
    report = run_evaluation(EvalRequest(
        checkpoint, data, output, image_folder, adapter, max_new_tokens,
        metric.value if metric else None, group_by, not vqa_simple, batch_size=batch_size))
    _show(report, output_format)


def _show(report: EvalReport, output_format: Format) -> None:
    import json

    from rich.console import Console

    from llava_cli.generation.evaluate import metrics_table

    if output_format is Format.json:
        typer.echo(json.dumps(report.as_json()))
        return
    Console().print(metrics_table(report))
    typer.echo(f"wrote {report.tally.n} predictions to {report.output}", err=True)

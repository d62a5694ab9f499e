"""`llava evaluate`: answer a QA file, score the answers, write the predictions."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llava_cli.commands.generate import Adapter, AllowOutside, MaxNewTokens, Overwrite

if TYPE_CHECKING:
    from llava_cli.generation.qa_evaluation import EvalReport

SCORING = "Scoring"


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
        "--image-folder", help="Where the records' relative image paths start (default: the "
        "data file's folder).")] = None,
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
    allow_outside: AllowOutside = False,
) -> None:
    """Answer every question of a QA file (greedy, the saved chat template) and score the
    answers: exact match, VQA soft accuracy, multiple-choice letters; overall and per group."""
    if not data.is_file():
        raise ValueError(f"--data {data}: no such file; give the QA file (.json or .jsonl)")
    from llava_cli.artifacts.output_dir import refuse_existing_file

    refuse_existing_file(output, overwrite)  # the quickest check first; the rest: `evaluate`
    from llava_cli.commands.common import quiet_libraries
    from llava_cli.generation.qa_evaluation import EvalRequest
    from llava_cli.generation.qa_evaluation import evaluate as run_evaluation

    quiet_libraries()
    report = run_evaluation(EvalRequest(
        checkpoint, data, output, image_folder, adapter, max_new_tokens,
        metric.value if metric else None, group_by, not vqa_simple, batch_size=batch_size,
        allow_outside=allow_outside, overwrite=overwrite))
    _show(report, output_format)


def _show(report: EvalReport, output_format: Format) -> None:
    import json

    from rich.console import Console

    from llava_cli.generation.qa_evaluation import metrics_table

    if output_format is Format.json:
        typer.echo(json.dumps(report.as_json()))
        return
    Console().print(metrics_table(report))
    typer.echo(f"wrote {report.tally.n} predictions to {report.output}", err=True)

"""`llava evaluate`: answer every question of a QA file with a trained model and score the
answers against the references (`answers.scoring`), overall and per group.

The answers are `llava generate`'s: the model's saved chat template, the training image
policy, greedy decoding cut at the template's end of turn, several records per generate call
(`answers.qa_set`, which training's `--eval-generate` evaluation answers with too). Every
record and image is read and checked, and the predictions file's place too
(`output_file.check_output_file`: not an input, writable), before the model is loaded, so bad
input fails in a second, not after the load or after the answers. The predictions are written
in one atomic step when every answer is in: they appear only complete, and a killed run
leaves no file behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.answers.generator import DEFAULT_MAX_NEW_TOKENS
from llava_cli.answers.qa_set import (
    DEFAULT_BATCH_SIZE,
    QASet,
    answer_questions,
    read_qa_set,
    score_record,
)
from llava_cli.answers.scoring import Tally, extract_choice


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate, on what, and how to score it."""

    checkpoint: Path
    data: Path
    output: Path
    image_folder: Path | None = None  # default: the data file's folder
    adapter: Path | None = None
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    metric: str | None = None  # None: per record (choice / vqa / exact)
    group_by: str | None = None  # None: `question_type` when records have it
    official_vqa: bool = True
    progress: bool = True
    batch_size: int = DEFAULT_BATCH_SIZE  # records per generate call (same answers as one)
    allow_outside: bool = False  # image paths may leave the image folder (../, /abs)
    overwrite: bool = False  # replace an existing predictions file


@dataclass
class EvalReport:
    """The scores of one evaluation."""

    tally: Tally
    group_by: str | None
    output: Path
    metrics: dict[str, int] = field(default_factory=dict)  # metric → records scored by it

    def as_json(self) -> dict[str, Any]:
        """The metrics as one JSON object (`--format json`)."""
        return {"accuracy": self.tally.accuracy(), "n": self.tally.n,
                "score_sum": self.tally.total, "metrics": self.metrics,
                "group_by": self.group_by, "groups": self.tally.group_accuracy(),
                "predictions": str(self.output)}


def evaluate(request: EvalRequest, generator: Any = None) -> EvalReport:
    """Answer and score every record of `request.data`; write the predictions file (one JSON
    line per record: id, prediction, score, references, group, metric, and for a
    multiple-choice record the letter read from the prediction). `generator`: an already
    loaded `Generator` (default: load `request.checkpoint`)."""
    from llava_cli.generation.answering_model import load_for_generation, model_folders
    from llava_cli.generation.output_file import check_output_file, write_lines

    qa = read_qa_set(request.data, request.image_folder, request.metric, request.group_by,
                     allow_outside=request.allow_outside)
    checkpoint, adapter = model_folders(request.checkpoint, request.adapter)
    check_output_file(Path(request.output), request.overwrite,
                      {"checkpoint": checkpoint, "adapter": adapter,
                       "checkpoint given": Path(request.checkpoint)},
                      {"data file": Path(request.data)},
                      (path for record in qa.records for path in record.images))
    if generator is None:
        generator = load_for_generation(request.checkpoint, request.adapter)
    report = EvalReport(Tally(), qa.group_by, Path(request.output))
    write_lines(report.output, _answer_all(generator, qa, request, report))
    return report


def _answer_all(generator: Any, qa: QASet, request: EvalRequest, report: EvalReport
                ) -> list[str]:
    """The predictions file's lines, the report tallied on the way."""
    from llava_cli.generation.batch import progress_bar

    lines = []
    with progress_bar(request.progress, len(qa), "evaluating") as advance:
        replies = answer_questions(generator, qa.records, qa.image_folder,
                                   request.max_new_tokens, request.batch_size,
                                   advance)
        for record, reply in zip(qa.records, replies, strict=True):
            score = score_record(record, reply, request.official_vqa)
            report.tally.add(score, record.group)
            report.metrics[record.metric] = report.metrics.get(record.metric, 0) + 1
            line = {"id": record.record_id, "prediction": reply, "score": score,
                    "references": record.references, "group": record.group,
                    "metric": record.metric}
            if record.metric == "choice":
                line["choice"] = extract_choice(reply, record.options)
            lines.append(json.dumps(line, ensure_ascii=False) + "\n")
    return lines


def metrics_table(report: EvalReport) -> Any:
    """A Rich table: accuracy (mean score, in percent) and count, overall and per group."""
    from rich.table import Table

    title = f"accuracy by {report.group_by}" if report.group_by else "accuracy"
    table = Table(title=title, title_justify="left")
    table.add_column(report.group_by or "", style="bold")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for group, row in report.tally.group_accuracy().items():
        table.add_row(group, str(row["n"]), f"{100 * row['accuracy']:.2f}%")
    table.add_section()
    table.add_row("overall", str(report.tally.n), f"{100 * report.tally.accuracy():.2f}%")
    return table

"""`llava evaluate`: answer every question of a QA file with a trained model and score the
answers against the references (`generation.scoring`), overall and per group.

The answers are `llava generate`'s: the model's saved chat template, the training image
policy, greedy decoding cut at the template's end of turn (`Generator.answer`). Every record
is read and checked before the model is loaded, so bad input fails in a second, not after the
load. The predictions file is written atomically: it appears only complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_cli.generation.generator import DEFAULT_MAX_NEW_TOKENS
from llava_cli.generation.qa import QARecord, check_group_field, check_metric, read_qa_record
from llava_cli.generation.scoring import Tally, extract_choice, score_answer

DEFAULT_GROUP = "question_type"


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


def read_qa_file(data: str | Path, metric: str | None = None, group_by: str | None = None
                 ) -> tuple[list[QARecord], str | None]:
    """Every record of `data` as a `QARecord`, and the field grouped by (an explicit
    `group_by` no record has is refused; by default `question_type`, when any record has it)."""
    from llava_cli.data.records import RecordIndex

    check_metric(metric)
    index = RecordIndex.open(data)
    raw = [index.read(i) for i in range(len(index))]
    if not raw:
        raise ValueError(f"{data}: no records to evaluate")
    if group_by is not None:
        check_group_field(raw, group_by, str(data))
    elif any(isinstance(r, dict) and DEFAULT_GROUP in r for r in raw):
        group_by = DEFAULT_GROUP
    records = [read_qa_record(r, i, str(data), metric, group_by) for i, r in enumerate(raw)]
    return records, group_by


def evaluate(request: EvalRequest, generator: Any = None) -> EvalReport:
    """Answer and score every record of `request.data`; write the predictions file (one JSON
    line per record: id, prediction, score, references, group, metric, and for a
    multiple-choice record the letter read from the prediction). `generator`: an already
    loaded `Generator` (default: load `request.checkpoint`)."""
    records, group_by = read_qa_file(request.data, request.metric, request.group_by)
    if generator is None:
        from llava_cli.generation.load import load_for_generation

        generator = load_for_generation(request.checkpoint, request.adapter)
    folder = request.image_folder if request.image_folder is not None \
        else Path(request.data).resolve().parent
    report = EvalReport(Tally(), group_by, Path(request.output))
    report.output.parent.mkdir(parents=True, exist_ok=True)
    _answer_all(generator, records, folder, request, report)
    return report


def _answer_all(generator: Any, records: list[QARecord], folder: Path, request: EvalRequest,
                report: EvalReport) -> None:
    from llava_cli.artifacts.files import atomic_path
    from llava_cli.generation.batch import progress_bar

    images = _ImageCache(generator, folder)
    with atomic_path(report.output) as partial, open(partial, "w", encoding="utf-8") as out, \
            progress_bar(request.progress, len(records), "evaluating") as advance:
        for record in records:
            reply = generator.answer(images.get(record.images) or None, record.question,
                                     request.max_new_tokens)
            score = score_answer(reply, record.references, record.metric, record.options,
                                 request.official_vqa)
            report.tally.add(score, record.group)
            report.metrics[record.metric] = report.metrics.get(record.metric, 0) + 1
            line = {"id": record.record_id, "prediction": reply, "score": score,
                    "references": record.references, "group": record.group,
                    "metric": record.metric}
            if record.metric == "choice":
                line["choice"] = extract_choice(reply, record.options)
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            advance()


class _ImageCache:
    """The images of the record before, kept: QA sets ask several questions about a picture in
    a row (VQA, MMBench's circular copies), and decoding it once is enough."""

    def __init__(self, generator: Any, folder: Path) -> None:
        self.generator, self.folder = generator, folder
        self.paths: list[str] = []
        self.images: list[Any] = []

    def get(self, paths: list[str]) -> list[Any]:
        """The decoded images of `paths` (relative to the image folder)."""
        from llava_cli.data.images import resolve_image_path

        if paths != self.paths:
            self.images = [self.generator.images.decode(resolve_image_path(self.folder, p),
                                                        label=p) for p in paths]
            self.paths = list(paths)
        return self.images


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

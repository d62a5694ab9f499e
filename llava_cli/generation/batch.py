"""Answering a whole file of records (`llava generate --data`): LLaVA conversations or QA
records, read and checked by the reader `llava evaluate` uses (`answers.qa_set`), answered
one at a time and written as JSON lines at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_cli.answers.generator import DEFAULT_MAX_NEW_TOKENS, GREEDY, Generator, Sampling
from llava_cli.answers.qa_set import QASet, read_qa_set
from llava_cli.generation.output_file import write_lines


def read_prompts(data: str | Path, image_folder: str | Path | None = None,
                 allow_outside: bool = False) -> QASet:
    """Every record of `data` checked whole before a model loads: LLaVA records (the first
    human turn, its gpt reply the reference) or QA records (`question`, `answer(s)`,
    `image`); a reference is optional. Images follow `data.image_paths`' rule."""
    return read_qa_set(data, image_folder, allow_outside=allow_outside, need_reference=False)


def answer_records(generator: Generator, prompts: QASet, output: str | Path,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True,
                   sampling: Sampling = GREEDY) -> int:
    """Answer every record of `prompts`; write JSON lines to `output` when all are answered.

    Each line: `{"id", "prompt", "answer", "reference"}` (reference: the first one, or null),
    and `"answers"` (all of them) when several are sampled per prompt.
    Returns the number of records answered.
    """
    lines = []
    with progress_bar(progress, len(prompts)) as advance:
        for record in prompts.records:
            images = [generator.images.decode(path, label=path) for path in record.images]
            replies = generator.answers(images or None, record.question, max_new_tokens,
                                        sampling)
            reference = record.references[0] if record.references else None
            line = {"id": record.record_id, "prompt": record.question, "answer": replies[0],
                    "reference": reference}
            if sampling.answers > 1:
                line["answers"] = replies
            lines.append(json.dumps(line) + "\n")
            advance()
    write_lines(Path(output), lines)
    return len(lines)


class progress_bar:  # noqa: N801 - used like a function
    """A rich progress bar on stderr (or nothing), yielding a callable that advances it (by
    one, or by the records of a batch)."""

    def __init__(self, enabled: bool, total: int, label: str = "answering") -> None:
        self.enabled, self.total, self.label, self.bar = enabled, total, label, None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n=1: None
        from rich.console import Console
        from rich.progress import Progress

        self.bar = Progress(console=Console(stderr=True), transient=False)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n=1: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

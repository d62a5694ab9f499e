"""Answering a whole LLaVA file: the first human turn of every record, as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llava_cli.answers.generator import DEFAULT_MAX_NEW_TOKENS, Generator
from llava_cli.answers.qa import record_prompt
from llava_cli.artifacts.files import atomic_path


def answer_records(generator: Generator, data: str | Path, output: str | Path,
                   image_folder: str | Path | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True) -> int:
    """Answer the first human turn of every record of `data`; write JSON lines to `output`.

    Each line: `{"id", "prompt", "answer", "reference"}` (reference: the first gpt turn, or
    null). Images are resolved against `image_folder` (default: the data file's folder).
    Returns the number of records answered.
    """
    from llava_cli.data.images import resolve_image_path
    from llava_cli.data.records import RecordIndex

    index = RecordIndex.open(data)
    folder = image_folder if image_folder is not None else Path(data).resolve().parent
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # OUT appears only when complete.
    with atomic_path(output) as partial, open(partial, "w") as out, \
            progress_bar(progress, len(index)) as advance:
        for i in range(len(index)):
            rid, prompt, paths, reference = record_prompt(index.read(i), i)
            images = [generator.images.decode(resolve_image_path(folder, p), label=p)
                      for p in paths]
            reply = generator.answer(images or None, prompt, max_new_tokens)
            out.write(json.dumps({"id": rid, "prompt": prompt, "answer": reply,
                                  "reference": reference}) + "\n")
            out.flush()
            advance()
    return len(index)


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

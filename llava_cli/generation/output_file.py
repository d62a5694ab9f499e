"""The file `llava generate --data` and `llava evaluate` write, checked before any model loads:
never over an input, somewhere it can be written, then written whole at the end.

An output that is the data file or one of the images it names, or that lies inside the
checkpoint, the adapter or the LoRA run's base, is refused (`--overwrite` would have replaced
the model or the questions). Its folder must be writable now, not found out after every answer.
The answers are kept in memory and written in one atomic step at the end (`artifacts.files`),
so an interrupted or killed run leaves no partial or hidden temporary file behind.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from llava_cli.artifacts.files import write_text_atomically
from llava_cli.artifacts.output_dir import refuse_existing_file, refuse_output_over_inputs


def check_output_file(output: Path, overwrite: bool, folders: Mapping[str, Path | None],
                      files: Mapping[str, Path | None], images: Iterable[str] = ()) -> None:
    """Refuse `output` (ValueError, one line) by the one rule for files a command writes
    (`artifacts.output_dir.refuse_existing_file`: a folder, over or inside an input — the
    `folders` read (checkpoint, adapter, base), the `files` read (the data file), each of the
    `images` read — or an existing file without `overwrite`), and when it cannot be written.
    Nothing is created."""
    inputs = {label: str(path) for label, path in {**folders, **files}.items()
              if path is not None}
    for image in images:
        refuse_output_over_inputs(output, {"image": image})
    refuse_existing_file(output, overwrite, inputs)
    _refuse_unwritable(output, output.resolve())


def _refuse_unwritable(output: Path, target: Path) -> None:
    """The nearest folder that exists on the way to `target` must be a folder we can write."""
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--output {output}: {folder} is a file, not a folder; choose "
                         "another location")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"--output {output}: cannot write in {folder} ({err.strerror}); "
                         "choose a writable location") from None


def write_lines(output: Path, lines: list[str]) -> None:
    """`lines` (each ending in a newline) written to `output` in one atomic step."""
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output, "".join(lines))

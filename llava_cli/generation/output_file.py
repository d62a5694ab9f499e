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
from llava_cli.artifacts.output_dir import refuse_existing_file


def check_output_file(output: Path, overwrite: bool, folders: Mapping[str, Path | None],
                      files: Mapping[str, Path | None], images: Iterable[str] = ()) -> None:
    """Refuse `output` (ValueError, one line) when it exists without `overwrite`, is a folder,
    lies inside one of `folders` (label → folder read: the checkpoint, adapter, base), is one
    of `files` (label → file read: the data file) or one of the `images` read, or cannot be
    written. Nothing is created."""
    refuse_existing_file(output, overwrite)
    target = output.resolve()
    for label, folder in folders.items():
        if folder is not None and folder.exists() and folder.resolve() in target.parents:
            raise ValueError(f"--output {output} lies inside the {label} {folder}: writing "
                             "there would change what is read; write it elsewhere")
    named = {**{str(p.resolve()): label for label, p in files.items() if p is not None},
             **{str(Path(p).resolve()): f"image {p}" for p in images}}
    if str(target) in named:
        raise ValueError(f"--output {output} is the {named[str(target)]}, an input of this "
                         "command; write it elsewhere")
    _refuse_unwritable(output, target)


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

"""The command boundary: whatever a command raises ends as one line on the terminal.

Known kinds of bad input (our ValueErrors, a path that is not there, a full disk, a damaged
weight file, input nested too deeply) print `llava COMMAND: what, where, what to do` and exit 2.
An output that failed its verification (merge-lora, convert: nothing was published) prints
its checks and exits 1. Anything else is a defect of ours: one line naming it and a file
holding the full traceback, exit 1. Ctrl-C prints "interrupted" and exits 130. Typer's own
exits pass through untouched.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from typer.exceptions import TyperException

BAD_INPUT = 2
DEFECT = 1
FAILED_CHECK = 1  # a written output did not reproduce its source: nothing was published
INTERRUPTED = 130


def guarded(command: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (a Typer command) with the boundary around it; the signature is kept, so
    Typer reads the same options."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, TyperException, SystemExit):
            raise  # Typer's own ways of ending a command
        except KeyboardInterrupt:
            _say(command, "interrupted")
            raise typer.Exit(INTERRUPTED) from None
        except BaseException as err:  # noqa: BLE001 — the boundary: nothing passes as a traceback
            if _is_failed_check(err):
                _say(command, str(err))
                raise typer.Exit(FAILED_CHECK) from None
            known = known_error_message(err)
            if known is not None:
                _say(command, known)
                raise typer.Exit(BAD_INPUT) from None
            where = write_traceback(command, err)
            saved = (f"the full traceback is in {where} (please attach it to a report)"
                     if where else "its traceback could not be saved (is the disk full?)")
            _say(command, f"unexpected error {type(err).__name__}: {_first_line(err)} — a defect "
                 f"of llava; {saved}")
            raise typer.Exit(DEFECT) from None

    return run


def known_error_message(err: BaseException) -> str | None:
    """The one-line message for a known kind of bad input, or None for anything else."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {err.filename}" if err.filename else ""
        return (f"no space left on the device{where}: free some space or choose another "
                "output location (complete outputs and checkpoints are kept; a partial one is "
                "never published)")
    if _is_disk_full(err):
        return ("no space left on the device while writing: free some space or choose another "
                "output location (complete outputs and checkpoints are kept; a partial one is "
                "never published)")
    if isinstance(err, RecursionError):
        return "an input is nested too deeply to read (a JSON or YAML file?); flatten it"
    if isinstance(err, OSError) and err.filename and err.strerror:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, (ValueError, OSError, NotImplementedError)) or _is_safetensors(err):
        # Our messages are written for the terminal; a library's may run to many lines.
        ours = type(err).__module__.startswith("llava_cli")
        return (str(err) if ours else "") or _first_line(err)
    return None


def _is_failed_check(err: BaseException) -> bool:
    if not isinstance(err, RuntimeError):
        return False
    from llava_cli.merge.verify import VerificationError

    return isinstance(err, VerificationError)


def _is_safetensors(err: BaseException) -> bool:
    # safetensors' Rust errors (a truncated or damaged file) are their own class.
    return type(err).__name__ == "SafetensorError"


def _is_disk_full(err: BaseException) -> bool:
    """torch.save and safetensors report a full disk in their own words, without errno."""
    text = str(err)
    writer_error = isinstance(err, (RuntimeError, OSError)) or _is_safetensors(err)
    return writer_error and ("No space left on device" in text or "file write failed" in text)


def write_traceback(command: str, err: BaseException) -> Path | None:
    """Write `err`'s full traceback to a file of its own; returns where (None when even that
    cannot be written: the boundary must not fail itself)."""
    from llava_cli.artifacts.files import write_text_atomically

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"llava-{command}-{stamp}-{os.getpid()}.traceback.txt"
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        return write_text_atomically(path, f"llava {command} {' '.join(sys.argv[1:])}\n\n{text}")
    except OSError:
        return None


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _say(command: str, message: str) -> None:
    typer.echo(f"llava {command}: {message}", err=True)

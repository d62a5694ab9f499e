"""The one way this tool writes a file: through a temporary file beside it, then a rename.

A crash, a kill or a full disk part-way through leaves the previous file (or none), never half
of one; a reader never sees a file that is still being written.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary path beside `target`; when the block ends without an error it
    replaces `target` in one rename, otherwise it is removed.

    The temporary name is unique (several processes may write the same target at once, e.g.
    every rank building the same record-index cache) and hidden (a leading dot).
    """
    target = Path(target)
    # Not mkstemp: its files are private (0600); the writer creates this one with the
    # process's usual permissions, as a plain write would.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)`, then move the result onto `target` (see `atomic_path`)."""
    with atomic_path(target) as temporary:
        write(temporary)
    return Path(target)


def write_text_atomically(target: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `target` atomically (UTF-8)."""
    return write_atomically(target, lambda path: path.write_text(text, encoding="utf-8"))


NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write is taken for a full disk


@contextmanager
def full_disk_named(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Writers report a full disk in their own words (torch.save: "unexpected pos …"); when a
    write in the block fails and `directory`'s disk is (nearly) full, raise it as the OSError
    ENOSPC it is, naming `directory`."""
    try:
        yield
    except Exception as err:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            raise err from None
        if free >= NEARLY_FULL:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory)) from err

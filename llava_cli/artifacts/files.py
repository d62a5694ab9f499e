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
    # Not mkstemp: its files are private (0600). Some writers make theirs private too
    # (safetensors' save_file), so the file gets the mode a plain write would give before it
    # moves in: readable by others wherever the umask allows.
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        if temporary.is_file() and not temporary.is_symlink():
            os.chmod(temporary, usual_mode())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def usual_mode(directory: bool = False) -> int:
    """The mode a plain `open(..., "w")` (0666) or `mkdir` (0777) gives under the process's
    umask: 0644 and 0755 under the usual umask 022."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # set and put back at once: the only portable way to read it
    os.umask(current)
    return current


def give_usual_modes(root: str | os.PathLike[str]) -> None:
    """`root` and everything under it get the modes a plain write and mkdir would give
    (`usual_mode`): what libraries create private (safetensors' writer: 0600 files;
    `tempfile.mkdtemp`: 0700 folders) becomes readable as any other output. Links are left
    alone (never followed)."""
    root = Path(root)
    if root.is_symlink() or not root.exists():
        return
    if root.is_dir():
        for folder, folders, files in os.walk(root):
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    os.chmod(path, usual_mode())
            for name in folders:
                if not (Path(folder) / name).is_symlink():
                    os.chmod(Path(folder) / name, usual_mode(directory=True))
    os.chmod(root, usual_mode(directory=root.is_dir()))


def write_atomically(target: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call `write(temporary_path)`, then move the result onto `target` (see `atomic_path`)."""
    with atomic_path(target) as temporary:
        write(temporary)
    return Path(target)


def write_text_atomically(target: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `target` atomically (UTF-8)."""
    return write_atomically(target, lambda path: path.write_text(text, encoding="utf-8"))


@contextmanager
def weight_file_named(file: str | os.PathLike[str]) -> Iterator[None]:
    """safetensors reports a damaged or truncated file without naming it ("incomplete
    metadata, file not fully covered"): raise that as a ValueError naming `file`."""
    try:
        yield
    except Exception as err:
        if type(err).__name__ != "SafetensorError":
            raise
        lines = str(err).strip().splitlines()
        raise ValueError(
            f"{file}: a damaged or truncated weight file "
            f"({lines[0] if lines else 'unreadable'}); restore it (re-save or "
            "re-download it) or point at a complete copy"
        ) from err


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


def default_cache_dir() -> Path:
    """Where our caches live (record indexes, transformers' field table):
    ``$LLAVA_CLI_CACHE/index`` if that variable is set, else ``~/.cache/llava_cli/index``."""
    root = os.environ.get("LLAVA_CLI_CACHE")
    return Path(root) / "index" if root else Path.home() / ".cache" / "llava_cli" / "index"

"""Compact, lazy index over a LLaVA annotation file (JSON array or JSON Lines).

LLaVA ``json.load``s its whole annotation file (1 GB for mix665k) in every dataloader
worker: GBs of RAM each. :class:`RecordIndex` keeps four numpy arrays instead (offset, size,
has-image flag and text size of each record: 25 bytes per record) and parses one record per
:meth:`RecordIndex.read`.

The build is a vectorised byte scan (`json_scan`). The index is cached as one ``.npz``
keyed by path, size, mtime and FORMAT_VERSION.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from llava_cli.artifacts.files import atomic_path, default_cache_dir
from llava_cli.data.json_scan import (
    CHUNK_SIZE,
    FIELDS,
    RecordFormatError,
    build_arrays,
    line_at,
)

__all__ = ["RecordFormatError", "RecordIndex", "default_cache_dir"]
# 2: has_image also reads the "images" key; 3: an object on top is refused; 4: and RLAIF-V's
# "image_path" (where neither "image" nor "images" is there)
FORMAT_VERSION = 4
class RecordIndex:
    """Where each record of one LLaVA annotation file lies; records are parsed on demand.

    Pickling (to spawned dataloader workers) sends the arrays, 25 bytes per record (17 MB
    for mix665k), never a file handle: cheap next to json.load's GBs, and workers need no
    cache dir. With the ``fork`` start method nothing is copied at all, as numpy arrays'
    pages stay shared. Each process opens its own file handle on its first read.
    """

    def __init__(self, path: str, arrays: dict[str, np.ndarray], key: str, lines: bool) -> None:
        self.path, self.key, self.lines = path, key, lines
        self.from_cache = False  # True when open() loaded the arrays from the cache
        self.offsets: np.ndarray = arrays["offsets"]  # int64 byte offset of each record
        self.sizes: np.ndarray = arrays["sizes"]  # int64 byte size of each record
        self.has_image: np.ndarray = arrays["has_image"]  # "image" (else "images") not null/""/[]
        self.text_bytes: np.ndarray = arrays["text_bytes"]  # bytes inside its JSON strings
        self._fh: Any = None
        self._pid = -1

    @staticmethod
    def _key(path: str) -> str:
        st = os.stat(path)
        return json.dumps([path, st.st_size, st.st_mtime_ns, FORMAT_VERSION])

    @classmethod
    def open(cls, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
             chunk_size: int = CHUNK_SIZE) -> RecordIndex:
        """Index ``path``, reusing the cached index if the file is unchanged.

        The cache lives in ``cache_dir`` (default :func:`default_cache_dir`); if that cannot
        be written, the index is built in memory only.
        """
        path = os.path.abspath(path)
        key = cls._key(path)
        name = f"{Path(path).name}.{hashlib.sha1(path.encode()).hexdigest()[:16]}.npz"
        file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
        try:
            with np.load(file, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    index = cls(path, {k: z[k] for k in FIELDS}, key, bool(z["lines"]))
                    index.from_cache = True
                    return index
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # missing or unreadable cache: rebuild it
        index = cls.build(path, chunk_size, key)
        index._save(file)
        return index

    @classmethod
    def build(cls, path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE,
              key: str | None = None) -> RecordIndex:
        """Scan ``path`` (one pass, ~0.5 GB/s) without touching any cache."""
        path = os.path.abspath(path)
        key = key or cls._key(path)  # stat before the scan: a concurrent write invalidates it
        lines, start = detect_format(path)
        arrays = build_arrays(path, chunk_size, lines, start)
        if lines:
            refuse_an_object_on_top(path, arrays)
        return cls(path, arrays, key, lines)

    def _save(self, file: Path) -> None:
        """Write the cache atomically; skip it silently if the directory is not writable."""
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(file) as temporary, open(temporary, "wb") as out:
                # A file object: given a path, np.savez would append ".npz" to it.
                np.savez(out, key=np.array(self.key), lines=np.array(self.lines),
                         **{k: getattr(self, k) for k in FIELDS})
        except OSError:
            return

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> dict[str, Any]:
        """Parse and return record ``i``, reading only its bytes."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range: {self.path} has {n} records")
        i %= n
        off = int(self.offsets[i])
        data = os.pread(self._file().fileno(), int(self.sizes[i]), off)
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            where = f"line {line_at(self.path, off)}" if self.lines else f"byte {off}"
            raise RecordFormatError(f"{self.path}: record #{i} ({where}) is not valid JSON "
                                    f"({e}); fix or remove that record") from e

    __getitem__ = read

    def origin(self, i: int) -> str:
        """How errors name record `i` (a mix names its source as well)."""
        return f"#{i}"

    def modality_lengths(self) -> np.ndarray:
        """LLaVA's signed lengths: + for image records, - for text-only (text-size proxy)."""
        return np.where(self.has_image, self.text_bytes, -self.text_bytes).astype(np.int64)

    def _file(self) -> Any:
        # A handle inherited through fork shares its offset with the parent: re-open per pid.
        if self._fh is None or self._pid != os.getpid():
            fh = open(self.path, "rb")  # noqa: SIM115 - kept open for later reads
            st = os.fstat(fh.fileno())
            if json.loads(self.key)[1:3] != [st.st_size, st.st_mtime_ns]:
                fh.close()
                raise RecordFormatError(f"{self.path} changed after it was indexed; call "
                                        "RecordIndex.open() again to re-index it")
            self._fh, self._pid = fh, os.getpid()
        return self._fh

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fh": None, "_pid": -1}


def detect_format(path: str) -> tuple[bool, int]:
    """(is JSON Lines, offset after any BOM): by the extension, else by the first byte."""
    with open(path, "rb") as f:
        start = 3 if f.read(3) == b"\xef\xbb\xbf" else 0
        f.seek(start)
        first = b""
        while not first and (data := f.read(1 << 16)):
            first = data.lstrip()[:1]
    if path.endswith(".jsonl") or first == b"{":
        return True, start
    if first != b"[":
        found = repr(first.decode("latin-1")) if first else "an empty file"
        raise RecordFormatError(f"{path}: expected a JSON array ('[') or JSON Lines ('{{'), "
                                f"found {found}; give a LLaVA annotation file")
    return False, start


def refuse_an_object_on_top(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Refuse a file read as JSON Lines that is one JSON object written out whole: its first
    record spans several lines (`json.dump(obj, indent=2)`), or a `.json` file holds a single
    object (LLaVA's `.json` is a list of records; its records in one object, say
    {"data": [...]}, would otherwise be one record with a misleading error)."""
    offsets, sizes = arrays["offsets"], arrays["sizes"]
    if not len(offsets):
        return
    first, size = int(offsets[0]), int(sizes[0])
    with open(path, "rb") as f:
        f.seek(first)
        spread = len(f.readline(size)) < size  # JSON strings hold no raw newline
    if spread and path.lower().endswith(".jsonl"):
        raise RecordFormatError(f"{path}: line {line_at(path, first)}: record #0 spans several "
                                "lines; JSON Lines holds one record per line")
    if spread or (len(offsets) == 1 and path.lower().endswith(".json")):
        raise RecordFormatError(f"{path}: the top level must be a list of records "
                                "([{...}, {...}]), not a JSON object; put the records in a "
                                "list, or give JSON Lines (one record per line, .jsonl)")

"""The on-disk cache of a source's index arrays: one .npz per source, keyed (path, sizes,
mtimes, format version) like `RecordIndex`'s, written atomically, skipped when unwritable."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_cli.artifacts.files import atomic_path
from llava_cli.data.records import default_cache_dir


def files_key(kind: str, version: int, files: list[str]) -> str:
    """The cache key of `files`: each one's path, size and mtime, the kind and its version."""
    stats = [[f, os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    return json.dumps([kind, version, stats])


def cached_arrays(kind: str, path: str, key: str, build: Callable[[], dict[str, np.ndarray]],
                  cache_dir: str | os.PathLike[str] | None = None
                  ) -> tuple[dict[str, np.ndarray], bool]:
    """(arrays, whether they came from the cache): the cached arrays if `key` matches, else
    `build()`'s, saved for next time."""
    name = f"{kind}.{Path(path).name}.{hashlib.sha1(path.encode()).hexdigest()[:16]}.npz"
    file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return {k: z[k] for k in z.files if k != "key"}, True
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # missing or unreadable cache: rebuild it
    arrays = build()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(file) as temporary, open(temporary, "wb") as out:
            np.savez(out, key=np.array(key), **arrays)
    except OSError:
        pass  # an unwritable cache only costs the next open a rebuild
    return arrays, False

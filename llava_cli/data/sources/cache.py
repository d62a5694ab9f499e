"""The on-disk cache of a source's index arrays: one .npz per source, keyed by its files'
identity (path, size, mtime, ctime, inode, a hash of each file's ends) and the format
version, written atomically, skipped when unwritable."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from llava_cli.artifacts.files import atomic_path, default_cache_dir

EDGE = 1 << 14  # the bytes hashed at each end of a file for its cache key


def files_key(kind: str, version: int, files: list[str]) -> str:
    """The cache key of `files`: the kind and its version, and for each file its path, size,
    mtime, ctime, inode and a hash of its first and last blocks. The stat fields alone miss
    a file replaced by one of the same size and mtime (`cp -p`, `rsync -t`, a restore); its
    ctime and inode change, and the hash catches the rest. Hashing 2 x 16 KiB per file costs
    well under a millisecond, where a full hash of a 1 GB shard costs about a second."""
    return json.dumps([kind, version, [[f, *_fingerprint(f)] for f in files]])


def _fingerprint(file: str) -> list[int | str]:
    """A file's identity: size, mtime, ctime, device, inode, and its ends' sha1."""
    with open(file, "rb") as f:
        st = os.fstat(f.fileno())
        digest = hashlib.sha1(f.read(EDGE))
        if st.st_size > EDGE:
            f.seek(max(EDGE, st.st_size - EDGE))
            digest.update(f.read(EDGE))
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino,
            digest.hexdigest()]


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

"""WebDataset tar shards: each sample is the members sharing a key (`KEY.json`, a LLaVA
record, and `KEY.jpg`/`.png`/…, its image). The shards are indexed once with the stdlib
`tarfile` (member headers only; the data is skipped) into numpy arrays of byte offsets,
cached like a `RecordIndex`; a record is then two reads at known offsets."""

from __future__ import annotations

import json
import os
import tarfile
from typing import Any

import numpy as np

from llava_cli.data.records import RecordFormatError
from llava_cli.data.sources.cache import cached_arrays, files_key
from llava_cli.data.sources.record import SourceRecord

FORMAT_VERSION = 2
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
FIELDS = ("shard", "json_offset", "json_size", "image_offset", "image_size", "image_ext")


class TarSource:
    """The samples of WebDataset shards as LLaVA records; a sample's image member becomes
    the record's (embedded) image. Pickles its arrays, never a file handle."""

    def __init__(self, path: str, files: list[str], arrays: dict[str, np.ndarray],
                 key: str) -> None:
        self.path, self.files, self.key = path, files, key
        for name in FIELDS:
            setattr(self, name, arrays[name])
        self.has_image = self.image_offset >= 0
        self.text_bytes = self.json_size  # the record's JSON size: the length proxy
        self.from_cache = False
        self._fds: dict[int, int] = {}
        self._pid = -1

    @classmethod
    def open(cls, path: str, files: list[str],
             cache_dir: str | os.PathLike[str] | None = None) -> TarSource:
        """Index the shards of one source (their member headers), cached."""
        key = files_key("tar", FORMAT_VERSION, files)
        arrays, hit = cached_arrays("tar", path, key, lambda: _build(files), cache_dir)
        source = cls(path, files, arrays, key)
        source.from_cache = hit
        return source

    def __len__(self) -> int:
        return len(self.json_offset)

    def read(self, i: int) -> Any:
        """Sample `i`: its JSON record, its image member's bytes beside it."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range: {self.path} has {len(self)}")
        fd, file = self._fd(int(self.shard[i])), self.files[int(self.shard[i])]
        data = os.pread(fd, int(self.json_size[i]), int(self.json_offset[i]))
        try:
            record = json.loads(data)
        except ValueError as err:
            raise RecordFormatError(f"{file}: sample #{i}'s .json member is not valid JSON "
                                    f"({err}); fix or remove that sample") from err
        if not isinstance(record, dict) or self.image_offset[i] < 0:
            return record
        name = f"<{os.path.basename(file)} sample {i}.{IMAGE_EXTENSIONS[self.image_ext[i]]}>"
        image = os.pread(fd, int(self.image_size[i]), int(self.image_offset[i]))
        return SourceRecord({**record, "image": name}, embedded={name: image})

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a descriptor is per process (forked workers re-open)
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        return self._fds[shard]

    def modality_lengths(self) -> np.ndarray:
        """LLaVA's signed lengths: + for image samples, - for text-only (JSON size proxy)."""
        return np.where(self.has_image, self.text_bytes, -self.text_bytes).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}


def _build(files: list[str]) -> dict[str, np.ndarray]:
    """One pass over every shard's member headers."""
    rows: list[list[int]] = []
    for number, file in enumerate(files):
        samples: dict[str, list[int]] = {}
        try:
            with tarfile.open(file, "r:") as tar:  # uncompressed: random access needs it
                for member in tar:
                    if member.issparse():  # its data is not one run of bytes at offset_data
                        raise RecordFormatError(f"{file}: member {member.name} is a sparse "
                                                "file; write the shard without --sparse")
                    if member.isfile():
                        _add(samples, number, member, file)
                    elif not member.isdir():  # a link's or a device's data is not in the shard
                        raise RecordFormatError(
                            f"{file}: member {member.name!r} is a {_kind(member)}, not a "
                            "regular file; write the shard with the files themselves "
                            "(tar --dereference)")
                end = tar.offset  # where tarfile stopped: the end blocks, or a bad header
        except (OSError, tarfile.TarError) as err:
            if str(err) == "unexpected end of data":  # a member's data runs past the end
                raise RecordFormatError(f"{file}: the shard is cut short inside a member's "
                                        f"data (it ends at byte offset "
                                        f"{os.path.getsize(file)}); write the shard again"
                                        ) from None
            raise RecordFormatError(f"{file}: not a readable (uncompressed) tar shard "
                                    f"({err})") from None
        _check_end(file, end, samples)
        for key, row in samples.items():
            if row[1] < 0:
                raise RecordFormatError(f"{file}: sample {key!r} has no {key}.json member; "
                                        "every WebDataset sample needs its LLaVA record")
            rows.append(row)
    table = np.asarray(rows, dtype=np.int64).reshape(-1, len(FIELDS))
    return {name: table[:, n] for n, name in enumerate(FIELDS)}


def _add(samples: dict[str, list[int]], number: int, member: tarfile.TarInfo,
         file: str) -> None:
    """Note one member under its sample key (WebDataset: the name up to the first dot of
    its last part)."""
    folder, _, base = member.name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return
    key = f"{folder}/{stem}" if folder else stem
    row = samples.setdefault(key, [number, -1, 0, -1, 0, -1])
    ext = ext.lower()
    if ext == "json":
        if row[1] >= 0:
            raise RecordFormatError(f"{file}: sample key {key!r} has two .json members (the "
                                    "second would replace the first record); give each "
                                    "sample its own key")
        row[1:3] = [member.offset_data, member.size]
    elif ext in IMAGE_EXTENSIONS:
        if row[3] >= 0:
            raise RecordFormatError(f"{file}: sample {key!r} has several images; a "
                                    "WebDataset sample here holds one")
        row[3:6] = [member.offset_data, member.size, IMAGE_EXTENSIONS.index(ext)]


def _kind(member: tarfile.TarInfo) -> str:
    """What a non-regular member is, in words."""
    if member.issym():
        return f"symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"hard link (to {member.linkname!r})"
    return "device or fifo" if member.isdev() else "special member"


def _check_end(file: str, end: int, samples: dict[str, list[int]]) -> None:
    """Refuse a shard that does not end as a whole tar does: tarfile stops quietly at a
    header it cannot read (a shard cut inside a header) or past the file's end (cut inside
    a member's data), which would drop the records after the cut without a word."""
    size = os.path.getsize(file)
    reach = max((max(row[1] + row[2], row[3] + row[4]) for row in samples.values()),
                default=0)
    if reach > size:
        raise RecordFormatError(f"{file}: the shard is cut short inside a member's data "
                                f"(it ends at byte offset {size}); write the shard again")
    with open(file, "rb") as f:
        f.seek(end)
        tail = f.read(1024)
        if len(tail) < 1024 or tail.strip(b"\0"):
            raise RecordFormatError(f"{file}: no tar member header or end-of-archive blocks "
                                    f"at byte offset {end} (the shard is cut short or "
                                    "damaged there); write the shard again")
        while block := f.read(1 << 20):  # after the end blocks: only padding
            if block.strip(b"\0"):
                raise RecordFormatError(f"{file}: data after the end-of-archive blocks at "
                                        f"byte offset {end}; write the shard again")

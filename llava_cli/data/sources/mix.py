"""`open_records`: one entry point for every data path, a LLaVA JSON/JSONL file (its
`RecordIndex`), a mix file, or one Arrow/Parquet/WebDataset source (a `MixIndex`).

A `MixIndex` maps a global position to (source, local position) with a few numpy arrays per
source: its bounds, and only for a repeat's fractional part the seeded selection of local
positions. Whole repeats are arithmetic (position modulo the source's length), so a mix of
ten 665k-record files costs no more memory than its sources' own indexes. The selection
depends on the mix file's seed alone, so every process and every resumed run sees the same
record at the same position: the Trainer's sampler then shuffles and skips as for one file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava_cli.data.records import RecordIndex
from llava_cli.data.sources.mixfile import (
    MixError,
    MixSpec,
    SourceSpec,
    is_mix_file,
    read_mix,
)
from llava_cli.data.sources.open import open_source
from llava_cli.data.sources.record import SourceRecord


def open_records(path: str | os.PathLike[str],
                 cache_dir: str | os.PathLike[str] | None = None) -> RecordIndex | MixIndex:
    """The record index of any data path: a `RecordIndex` for a LLaVA JSON/JSONL file, a
    `MixIndex` for a mix file or a single Arrow/Parquet/tar source. Raises `MixError` for a
    bad mix file and `RecordFormatError` for a bad data file."""
    path = os.fspath(path)
    if os.path.isfile(path) and is_mix_file(path):
        return MixIndex.open(read_mix(path), cache_dir)
    source = open_source(path, cache_dir)
    if isinstance(source, RecordIndex):
        return source
    spec = MixSpec(os.path.abspath(path), (SourceSpec(os.path.basename(path), path),))
    return MixIndex(spec, [source])


class MixIndex:
    """Several sources read as one list of records (see the module doc); the same interface
    as `RecordIndex` (len, read, modality_lengths, has_image, text_bytes, path, key).

    Each record comes back as a `SourceRecord` naming its source and position (`origin`) and
    carrying its source's image folder. Pickles as its sources do (arrays, no file handles).
    """

    def __init__(self, spec: MixSpec, sources: list[Any]) -> None:
        self.spec, self.sources, self.path = spec, sources, spec.path
        self.key = json.dumps([spec.path, spec.seed, [s.key for s in sources]])
        self.from_cache = all(getattr(s, "from_cache", False) for s in sources)
        repeats = _repeats(spec, [len(s) for s in sources])
        # Per source: how many records it gives, and the local positions of the fractional
        # part (after its whole copies), seeded by the mix's seed and the source's number.
        self.counts = np.zeros(len(sources), dtype=np.int64)
        self.extra: list[np.ndarray] = []
        for n, (source, repeat) in enumerate(zip(sources, repeats, strict=True)):
            size = len(source)
            whole, part = int(repeat), repeat - int(repeat)
            take = min(size, int(round(part * size)))
            rng = np.random.default_rng([spec.seed, n])
            chosen = np.sort(rng.choice(size, size=take, replace=False)) if take else \
                np.zeros(0, dtype=np.int64)
            self.extra.append(chosen.astype(np.int32 if size < 2**31 else np.int64))
            count = whole * size + take  # a Python int: a huge repeat is named, not overflowed
            if count > MAX_POSITIONS or count + int(self.counts.sum()) > MAX_POSITIONS:
                raise MixError(f"{spec.path}: source {spec.sources[n].name!r} makes the mix "
                               f"{count + int(self.counts.sum()):,} positions ({size:,} records "
                               f"x repeat {repeat:g}), above the limit of {MAX_POSITIONS:,}; "
                               "lower its repeat or weight")
            self.counts[n] = count
        self.bounds = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    @classmethod
    def open(cls, spec: MixSpec, cache_dir: str | os.PathLike[str] | None = None) -> MixIndex:
        """Open every source of `spec` (each index cached as its kind caches); a file named
        by several sources (other folders, other repeats) is indexed and held once."""
        opened: dict[str, Any] = {}
        for source in spec.sources:
            if source.path not in opened:
                opened[source.path] = open_source(source.path, cache_dir)
        return cls(spec, [opened[s.path] for s in spec.sources])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(source number, local position) of global position `i`."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range: {self.path} has {n} records")
        i %= n
        s = int(np.searchsorted(self.bounds, i, side="right")) - 1
        j, size = i - int(self.bounds[s]), len(self.sources[s])
        whole = int(self.counts[s]) - len(self.extra[s])
        return s, (j % size if j < whole else int(self.extra[s][j - whole]))

    def origin(self, i: int) -> str:
        """How errors name record `i`: its source and local position."""
        s, local = self.locate(i)
        return f"{self.spec.sources[s].name}#{local}"

    def read(self, i: int) -> Any:
        """Record `i`, as a `SourceRecord` (a record that is no JSON object comes back as
        it is: the record checks report it)."""
        s, local = self.locate(i)
        record = self.sources[s].read(local)
        if not isinstance(record, dict):
            return record
        if not isinstance(record, SourceRecord):
            record = SourceRecord(record)
        record.origin = f"{self.spec.sources[s].name}#{local}"
        record.image_folder = self.spec.sources[s].image_folder
        return record

    __getitem__ = read

    def _whole(self, n: int) -> int:
        """How many whole copies of source `n` the mix holds."""
        return (int(self.counts[n]) - len(self.extra[n])) // max(len(self.sources[n]), 1)

    def _gather(self, field: str) -> np.ndarray:
        parts = []
        for n, source in enumerate(self.sources):
            values = np.asarray(getattr(source, field))
            parts += [np.tile(values, self._whole(n)), values[self.extra[n]]]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def distinct(self) -> Distinct | None:
        """The mix's distinct records (`Distinct`), so that a scan reads each record once
        however often its repeats show it; None when every position is its own record."""
        if all(int(c) <= len(s) for c, s in zip(self.counts, self.sources, strict=True)):
            return None
        firsts, copies, of, seen = [], [], [], 0
        for n, source in enumerate(self.sources):
            size, extra, whole = len(source), self.extra[n].astype(np.int64), self._whole(n)
            base = int(self.bounds[n])
            if whole >= 1:
                count = np.full(size, whole, dtype=np.int64)
                count[extra] += 1  # the fractional part shows these once more
                firsts.append(base + np.arange(size, dtype=np.int64))
                copies.append(count)
                of.append(seen + np.concatenate([np.tile(np.arange(size), whole), extra]))
            else:  # a subsample: each chosen record shows once
                firsts.append(base + np.arange(len(extra), dtype=np.int64))
                copies.append(np.ones(len(extra), dtype=np.int64))
                of.append(seen + np.arange(len(extra), dtype=np.int64))
            seen += len(firsts[-1])
        return Distinct(np.concatenate(firsts), np.concatenate(copies),
                        np.concatenate(of).astype(np.int64))

    @property
    def has_image(self) -> np.ndarray:
        """Per record: whether it has an image (built on demand, one bool a record)."""
        return self._gather("has_image").astype(bool)

    @property
    def text_bytes(self) -> np.ndarray:
        """Per record: its text size (the length proxy of `modality_lengths`)."""
        return self._gather("text_bytes").astype(np.int64)

    def modality_lengths(self) -> np.ndarray:
        """LLaVA's signed lengths: + for image records, - for text-only (text-size proxy)."""
        return np.where(self.has_image, self.text_bytes, -self.text_bytes).astype(np.int64)


def _repeats(spec: MixSpec, sizes: list[int]) -> list[float]:
    """Each source's repeat count: as given (default 1), or from weights: a source's share of
    the mix is its weight over the total, the mix as long as its sources together."""
    if spec.sources and spec.sources[0].weight is not None:
        total, weights = sum(sizes), [s.weight or 0.0 for s in spec.sources]
        return [w / sum(weights) * total / size if size else 0.0
                for w, size in zip(weights, sizes, strict=True)]
    return [1.0 if s.repeat is None else s.repeat for s in spec.sources]


MAX_POSITIONS = 10**9  # positions a mix may have: beyond, a repeat is a typo, not a plan


@dataclass(frozen=True)
class Distinct:
    """A mix's distinct records, where repeats show some more than once: the first position of
    each (`firsts`), how many positions show it (`copies`), and for each position the number
    of its distinct record (`of`, an index into `firsts`)."""

    firsts: np.ndarray
    copies: np.ndarray
    of: np.ndarray

    def spread(self, lengths: np.ndarray) -> np.ndarray:
        """(first position, tokens) rows → (position, tokens) rows of every position that
        shows one of those records."""
        tokens = np.full(len(self.firsts), -1, dtype=np.int64)
        tokens[np.searchsorted(self.firsts, lengths[:, 0])] = lengths[:, 1]
        shown = tokens[self.of]
        positions = np.flatnonzero(shown >= 0)
        return np.stack([positions, shown[positions]], axis=1)


Records = RecordIndex | MixIndex  # what `open_records` returns

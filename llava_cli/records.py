"""Compact, lazy index over a LLaVA annotation file (JSON array or JSON Lines).

LLaVA's loader ``json.load``s the whole annotation file (1 GB for mix665k) into every
dataloader worker, which costs several GB of RAM per worker. :class:`RecordIndex` instead
keeps four small numpy arrays (byte offset, byte size, has-image flag, text size of each
record; ~21 bytes per record) and parses one record at a time on :meth:`RecordIndex.read`.

The index is built by a vectorised scan (simdjson-style, in numpy): per chunk, bit masks of
quotes, backslashes and brackets are packed into uint64 words; escaped quotes are dropped;
a prefix XOR over the quote bits marks the bytes inside strings; the brackets outside
strings give the nesting depth by a cumulative sum. Each chunk starts right after the last
complete record of the previous one, so it always starts outside any string at a known
depth and no scan state has to be carried across chunks. The result is cached as one
``.npz`` keyed by absolute path, size, mtime and :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = 1
CHUNK_SIZE = 16 << 20  # bytes per scan; ~8x this is the peak memory of a build
_FIELDS = ("offsets", "sizes", "has_image", "text_bytes")
_U64 = np.uint64
_ONES = _U64(0xFFFFFFFFFFFFFFFF)
_WS = np.zeros(256, bool)
_WS[[9, 10, 13, 32]] = True
_popcount = getattr(np, "bitwise_count", None)
if _popcount is None:  # numpy < 2.0
    _POP8 = np.array([bin(i).count("1") for i in range(256)], np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        return _POP8[x.view(np.uint8)].reshape(*x.shape, 8).sum(-1)


class RecordFormatError(ValueError):
    """The annotation file is not a JSON array of objects or JSON Lines of objects."""


def _pack(mask: np.ndarray) -> np.ndarray:
    """Pack a bool mask (length a multiple of 64) into uint64 words; bit i is byte i."""
    return np.packbits(mask, bitorder="little").view("<u8")


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    """Move bits k bytes toward higher offsets (k > 0) or lower offsets (k < 0)."""
    if k > 0:
        y = x << _U64(k)
        y[1:] |= x[:-1] >> _U64(64 - k)
    else:
        y = x >> _U64(-k)
        y[:-1] |= x[1:] << _U64(64 + k)
    return y


def _positions(x: np.ndarray) -> np.ndarray:
    """Byte offsets of the set bits of packed words, ascending."""
    u8 = x.view(np.uint8)
    nz = np.flatnonzero(u8)
    rows, bits = np.nonzero(np.unpackbits(u8[nz, None], axis=1, bitorder="little"))
    return nz[rows] * 8 + bits


def _unescape(a: np.ndarray, q: np.ndarray, bs: np.ndarray) -> None:
    """Clear quote bits preceded by an odd run of backslashes (escaped quotes), in place."""
    cand = q & _shift(bs, 1)
    if not cand.any():
        return
    pos = _positions(cand)
    run, live = np.ones(len(pos), np.int64), np.ones(len(pos), bool)
    while live.any():  # runs are short: one vectorised step per backslash in the longest run
        j = pos - run - 1
        live &= j >= 0
        live[live] = a[j[live]] == 92
        run += live
    odd = pos[run % 2 == 1]
    np.bitwise_xor.at(q, odd >> 6, _U64(1) << (odd & 63).astype(np.uint64))


def _in_string(q: np.ndarray) -> np.ndarray:
    """Bits of the bytes inside strings (opening quote included): prefix XOR of quote bits."""
    x = q.copy()
    for k in (1, 2, 4, 8, 16, 32):
        x ^= x << _U64(k)
    carry = np.bitwise_xor.accumulate(x >> _U64(63))  # parity of all quotes up to each word
    x[1:] ^= carry[:-1] * _ONES
    return x


def _skip_ws(a: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Advance each offset in ``j`` past JSON whitespace (staying below ``n``)."""
    j = np.minimum(j, n - 1)
    while (step := _WS[a[j]] & (j < n - 1)).any():
        j = j + step
    return j


def _kind(c: int) -> str:
    names = {34: "string", 91: "array", 116: "boolean", 102: "boolean", 110: "null"}
    return "number" if chr(c) in "-0123456789" else names.get(c, f"invalid token {chr(c)!r}")


class _Scanner:
    """Finds records chunk by chunk; see the module docstring for the method."""

    def __init__(self, path: str, lines: bool) -> None:
        self.path, self.lines, self.r = path, lines, 0 if lines else 1
        self.depth, self.n, self.closed = 0, 0, False
        self.parts: list[tuple[np.ndarray, ...]] = []

    def fail(self, off: int, msg: str) -> RecordFormatError:
        where = f"line {_line_at(self.path, off)}" if self.lines else f"byte {off}"
        return RecordFormatError(f"{self.path}: {where}: {msg}")

    def scan(self, a: np.ndarray, n: int, base: int, eof: bool) -> int:
        """Index the complete records in ``a[:n]`` (file offset ``base``); return bytes used."""
        if self.closed:
            self.check_ws(a, 0, n, base)
            return n
        q, bs = _pack(a == 34), _pack(a == 92)
        st = _pack((a & 0xD9) == 0x59)  # [ ] { } (and Y _ y DEL, which are invalid outside strings)
        _unescape(a, q, bs)
        instr = _in_string(q)
        p = _positions(st & ~instr)
        kind = a[p]
        if len(bad := np.flatnonzero(((kind >> 1) ^ (kind >> 2)) & 1 == 0)):
            raise self.fail(base + int(p[bad[0]]), f"invalid JSON: unexpected {chr(kind[bad[0]])!r}")
        opening = (kind & 2) != 0
        depth = self.depth + np.cumsum(np.where(opening, 1, -1))
        if len(neg := np.flatnonzero(depth < 0)):
            raise self.fail(base + int(p[neg[0]]), f"unbalanced {chr(kind[neg[0]])!r}")
        r = self.r
        starts, ends = np.flatnonzero(opening & (depth == r + 1)), np.flatnonzero(~opening & (depth == r))
        for i in starts[kind[starts] != 123][:1]:
            k = self.n + int(np.searchsorted(starts, i))
            raise self.fail(base + int(p[i]), self.not_object(k, "array"))
        if len(ends) and (kind[ends] != 125).any():
            raise self.fail(base + int(p[ends[kind[ends] != 125][0]]), "mismatched brackets")
        top = np.flatnonzero(depth == 0) if not self.lines else ends[:0]
        if len(top):  # the closing ']' of the top-level array
            last = int(top[0])
            if kind[last] != 93:
                raise self.fail(base + int(p[last]), "mismatched brackets")
            self.closed = True
            self.check_ws(a, int(p[last]) + 1, n, base)
        elif len(ends):
            last = int(ends[-1])
        elif not eof:
            return 0  # no complete record yet: the caller grows the buffer
        else:
            last = -1
        starts, ends = starts[starts < last], ends[ends <= last]
        self.check_gaps(a, p, opening, depth, starts, top[:1], base)
        self.add(a, n, p, depth, q, instr, starts, ends, base)
        cut = n if self.closed else (int(p[last]) + 1 if last >= 0 else 0)
        if eof and not self.closed:
            self.check_end(a, p, depth, last, cut, n, base)
        self.depth = r
        return max(cut, n if eof else 0)

    def not_object(self, k: int, what: str) -> str:
        if self.lines:
            return f"expected one JSON object per line, found a JSON {what}; fix or remove that line"
        return (f"record #{k} is a JSON {what}, not an object; every element of the top-level "
                "array must be one sample object - fix or remove it")

    def check_ws(self, a: np.ndarray, i: int, j: int, base: int) -> None:
        """Only whitespace may follow the closing ']'."""
        if len(bad := np.flatnonzero(~_WS[a[i:j]])):
            raise self.fail(base + i + int(bad[0]), "unexpected data after the closing ']'")

    def check_gaps(self, a, p, opening, depth, starts, top, base) -> None:  # noqa: ANN001
        """The bytes before each record (and before ']') hold whitespace and one separator."""
        ev = np.concatenate([starts, top])
        prev = ev - 1
        g0 = np.where(prev >= 0, p[prev] + 1, 0)
        need = np.where(prev >= 0, ~opening[prev] & (depth[prev] == self.r), self.n > 0)
        need[len(starts):] = False  # no separator before ']'
        lens = p[ev] - g0
        seg = np.cumsum(lens) - lens
        idx = np.arange(int(lens.sum())) + np.repeat(g0 - seg, lens)
        vals = a[idx]
        sep = 10 if self.lines else 44
        if len(junk := np.flatnonzero(~_WS[vals] & (vals != sep))):
            k = self.n + int(np.searchsorted(seg, junk[0], side="right")) - 1
            raise self.fail(base + int(idx[junk[0]]), self.not_object(k, _kind(vals[junk[0]])))
        cum = np.concatenate([[0], np.cumsum(vals == sep)])
        count = cum[seg + lens] - cum[seg]
        bad = np.flatnonzero((count == 0) & need if self.lines else count != need)
        if len(bad):
            i = int(bad[0])
            if self.lines:
                raise self.fail(base + int(p[ev[i]]), "more than one JSON value on one line")
            what = "missing ',' before" if need[i] else "unexpected ',' before"
            raise self.fail(base + int(p[ev[i]]), f"{what} this element")

    def check_end(self, a, p, depth, last, cut, n, base) -> None:  # noqa: ANN001
        """At end of file: nothing may be left open; only whitespace may trail."""
        rest = np.flatnonzero((depth == self.r + 1) & (np.arange(len(p)) > last))
        if len(rest):
            off = base + int(p[rest[0]])
            if self.lines:
                raise self.fail(off, "JSON object is not closed (truncated line or unbalanced "
                                "brackets); fix or remove that line")
            raise RecordFormatError(
                f"{self.path}: unexpected end of file inside record #{self.n} (starts at byte "
                f"{off}); the file looks truncated - re-download or regenerate it")
        if not self.lines:
            raise RecordFormatError(
                f"{self.path}: unexpected end of file at byte {base + n}: the top-level JSON "
                "array is not closed with ']'; the file looks truncated - re-download or "
                "regenerate it")
        if len(junk := np.flatnonzero(~_WS[a[cut:n]])):
            off = base + cut + int(junk[0])
            raise self.fail(off, self.not_object(self.n, _kind(a[cut + junk[0]])))

    def add(self, a, n, p, depth, q, instr, starts, ends, base) -> None:  # noqa: ANN001
        """Append offsets, sizes, has-image flags and text sizes of the complete records."""
        s, e = p[starts], p[ends]
        pc = np.cumsum(_popcount(instr), dtype=np.int64)

        def set_bits_before(pos: np.ndarray) -> np.ndarray:
            w, low = pos >> 6, (_U64(1) << (pos & 63).astype(np.uint64)) - _U64(1)
            return np.where(w > 0, pc[w - 1], 0) + _popcount(instr[w] & low)

        # Top-level key "image": a 5-byte string at record depth followed by ':'. Escaped
        # quotes were removed, so the text '\"image\"' inside a conversation never matches.
        k = _positions(q & instr & _shift(q & ~instr, -6))
        k = k[k < (e[-1] if len(e) else 0)]
        for i, ch in enumerate(b"image", 1):
            k = k[a[k + i] == ch]
        before = np.searchsorted(p, k) - 1
        k = k[np.where(before >= 0, depth[before], self.depth) == self.r + 1]
        colon = _skip_ws(a, k + 7, n)
        k, v = k[a[colon] == 58], _skip_ws(a, colon[a[colon] == 58] + 1, n)
        c, c1 = a[v], a[_skip_ws(a, v + 1, n)]
        empty = (c == 110) | ((c == 34) & (a[np.minimum(v + 1, n - 1)] == 34)) | (
            (c == 91) & (c1 == 93))
        has = np.zeros(len(s), bool)
        has[np.searchsorted(s, k, side="right") - 1] = ~empty
        text = set_bits_before(e) - set_bits_before(s)
        self.parts.append((base + s, e - s + 1, has, np.maximum(text, 1)))
        self.n += len(s)


def _line_at(path: str, off: int) -> int:
    """1-based line number of byte ``off`` (only used for error messages)."""
    count = 0
    with open(path, "rb") as f:
        while off > 0 and (data := f.read(min(off, 1 << 24))):
            count, off = count + data.count(b"\n"), off - len(data)
    return count + 1


def _detect(path: str) -> tuple[bool, int]:
    """(is JSON Lines, offset to start scanning at): by extension, else by first byte."""
    with open(path, "rb") as f:
        start = 3 if f.read(3) == b"\xef\xbb\xbf" else 0  # skip a UTF-8 byte order mark
        f.seek(start)
        while data := f.read(1 << 16):
            if stripped := data.lstrip():
                first = stripped[:1]
                break
        else:
            first = b""
    if path.endswith(".jsonl") or first == b"{":
        return True, start
    if first != b"[":
        found = "an empty file" if not first else f"{first.decode('latin-1')!r}"
        raise RecordFormatError(f"{path}: expected a JSON array ('[') or JSON Lines ('{{'), "
                                f"found {found}; give a LLaVA annotation file")
    return False, start


def _build(path: str, chunk_size: int = CHUNK_SIZE) -> dict[str, np.ndarray]:
    """Scan ``path`` once and return the index arrays."""
    lines, start = _detect(path)
    sc = _Scanner(path, lines)
    buf = np.zeros(max(64, -(-chunk_size // 64) * 64), np.uint8)
    fill, base = 0, start
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while True:
            got = f.readinto(memoryview(buf)[fill:])
            fill += got
            if got and fill < len(buf):
                continue  # short read: fill the buffer first
            pad = -(-fill // 64) * 64
            buf[fill:pad] = 0  # zero bytes are not special to the scan
            cut = sc.scan(buf[:max(pad, 64)], fill, base, eof=not got)
            if not got:
                break
            if cut == 0:  # one record is larger than the buffer
                buf = np.concatenate([buf, np.zeros_like(buf)])
            buf[: fill - cut] = buf[cut:fill]
            fill, base = fill - cut, base + cut
    cols = list(zip(*sc.parts)) or [[np.zeros(0, t)] for t in (np.int64, np.int64, bool, np.int64)]
    return {name: np.concatenate(c) for name, c in zip(_FIELDS, cols)}


def default_cache_dir() -> Path:
    """``$LLAVA_CLI_CACHE/index`` if that variable is set, else ``~/.cache/llava_cli/index``."""
    root = os.environ.get("LLAVA_CLI_CACHE")
    return Path(root) / "index" if root else Path.home() / ".cache" / "llava_cli" / "index"


class RecordIndex:
    """Byte offsets of the records of one LLaVA annotation file; records parsed on demand.

    Pickling sends the arrays (~21 bytes per record, 14 MB for mix665k) and not the file
    handle. That is cheap next to the GB that json.load costs per worker, needs no cache dir
    in the workers, and with the default ``fork`` start method nothing is copied at all:
    the arrays' pages stay shared. Each process opens its own file handle on first read.
    """

    def __init__(self, path: str, arrays: dict[str, np.ndarray], key: str, lines: bool) -> None:
        self.path, self.key, self.lines, self.from_cache = path, key, lines, False
        self.offsets: np.ndarray = arrays["offsets"]
        self.sizes: np.ndarray = arrays["sizes"]
        self.has_image: np.ndarray = arrays["has_image"]
        self.text_bytes: np.ndarray = arrays["text_bytes"]  # bytes inside JSON strings
        self._fh: Any = None
        self._pid = -1

    @classmethod
    def open(cls, path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
             chunk_size: int = CHUNK_SIZE) -> RecordIndex:
        """Index ``path``, reusing the cached index if the file is unchanged.

        The cache lives in ``cache_dir`` (default :func:`default_cache_dir`); if it cannot
        be written the index is built in memory only.
        """
        path = os.path.abspath(path)
        st = os.stat(path)
        key = json.dumps([path, st.st_size, st.st_mtime_ns, FORMAT_VERSION])
        name = f"{Path(path).name}.{hashlib.sha1(path.encode()).hexdigest()[:16]}.npz"
        file = Path(cache_dir if cache_dir is not None else default_cache_dir()) / name
        lines = path.endswith(".jsonl")
        if (arrays := _load(file, key)) is not None:
            index = cls(path, arrays, key, bool(arrays.pop("lines", lines)))
            index.from_cache = True
            return index
        index = cls.build(path, chunk_size, key)
        _save(file, key, index)
        return index

    @classmethod
    def build(cls, path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE,
              key: str | None = None) -> RecordIndex:
        """Scan ``path`` without touching any cache."""
        path = os.path.abspath(path)
        if key is None:
            st = os.stat(path)
            key = json.dumps([path, st.st_size, st.st_mtime_ns, FORMAT_VERSION])
        return cls(path, _build(path, chunk_size), key, _detect(path)[0])

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> dict[str, Any]:
        """Parse and return record ``i`` (a dict), reading only its bytes."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range: {self.path} has {n} records")
        i %= n
        off, size = int(self.offsets[i]), int(self.sizes[i])
        data = os.pread(self._file().fileno(), size, off)
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            where = f"line {_line_at(self.path, off)}" if self.lines else f"byte {off}"
            raise RecordFormatError(f"{self.path}: record #{i} ({where}) is not valid JSON "
                                    f"({e}); fix or remove that record") from e

    __getitem__ = read

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


def _load(file: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``file`` exists and matches ``key``, else None."""
    try:
        with np.load(file, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in (*_FIELDS, "lines")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _save(file: Path, key: str, index: RecordIndex) -> None:
    """Write the cache atomically; silently skip it if the directory is not writable."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), lines=np.array(index.lines),
                     **{k: getattr(index, k) for k in _FIELDS})
        os.replace(tmp, file)
    except OSError:
        Path(tmp).unlink(missing_ok=True)

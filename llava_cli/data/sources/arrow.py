"""Table sources: a `datasets` folder (`Dataset.save_to_disk`: memory-mapped Arrow files) or
Parquet file(s), read one row at a time with pyarrow (rows converted by `rows`).

Arrow files are memory-mapped, so a worker's memory holds only the pages it touches. Parquet
is read a row group at a time, keeping the last one (random order then re-reads a group per
record: repack big Parquet data with small row groups, or save it with save_to_disk). The
per-row image flags and text sizes are computed once from the columns and cached.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from llava_cli.data.records import RecordFormatError
from llava_cli.data.sources.cache import cached_arrays, files_key
from llava_cli.data.sources.rows import image_column, llava_record

FORMAT_VERSION = 2
TEXT_COLUMNS = ("conversations", "conversation", "messages")
# Preference tables (`data.preference_pairs`' layouts): ours and LLaVA-NeXT's, TRL's, RLAIF-V's
# (a prompt and chosen/rejected replies) and LLaVA-RLHF's (two outputs and a preference).
PROMPT_COLUMNS = ("conversations", "prompt", "question")
REPLY_COLUMNS = (("chosen", "rejected"), ("output_1", "output_2"))
LAYOUTS = ("LLaVA's `conversations` or chat `messages`, or a preference layout: a prompt "
           "(`conversations`, `prompt` or `question`) with `chosen` and `rejected`, or "
           "`output_1`, `output_2` and `preference`")


class ArrowSource:
    """The rows of Arrow or Parquet files as LLaVA records (`read`), with per-row image
    flags and text sizes. Pickles without open files; each process maps its own."""

    def __init__(self, path: str, files: list[str], kind: str, arrays: dict[str, np.ndarray],
                 key: str) -> None:
        self.path, self.files, self.kind, self.key = path, files, kind, key
        self.bounds: np.ndarray = arrays["bounds"]  # first row of each piece (file/row group)
        self.pieces: np.ndarray = arrays["pieces"]  # (file number, row group) of each piece
        self.has_image: np.ndarray = arrays["has_image"]
        self.text_bytes: np.ndarray = arrays["text_bytes"]
        self.from_cache = False
        self._open: dict[int, Any] = {}  # file number → memory-mapped table / ParquetFile
        self._group: tuple[int, Any] = (-1, None)  # the last Parquet row group read
        self._pid = -1

    @classmethod
    def open(cls, path: str, files: list[str], kind: str,
             cache_dir: str | os.PathLike[str] | None = None) -> ArrowSource:
        """Index the files of one source (cached like a `RecordIndex`)."""
        key = files_key(kind, FORMAT_VERSION, files)
        arrays, hit = cached_arrays(kind, path, key, lambda: _build(files, kind), cache_dir)
        source = cls(path, files, kind, arrays, key)
        source.from_cache = hit
        return source

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, i: int) -> dict[str, Any]:
        """Row `i` as a LLaVA record (a `SourceRecord` with any embedded images)."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range: {self.path} has {len(self)} rows")
        piece = int(np.searchsorted(self.bounds, i, side="right")) - 1
        table = self._piece(piece)
        row = table.slice(i - int(self.bounds[piece]), 1).to_pylist()[0]
        return llava_record(row)

    def _piece(self, piece: int) -> Any:
        if self._pid != os.getpid():  # mapped files and readers are per process
            self._open, self._group, self._pid = {}, (-1, None), os.getpid()
        number, group = (int(v) for v in self.pieces[piece])
        if number not in self._open:
            self._open[number] = _open_file(self.files[number], self.kind)
        if self.kind == "arrow":
            return self._open[number]
        if self._group[0] != piece:
            self._group = (piece, self._open[number].read_row_group(group))
        return self._group[1]

    def modality_lengths(self) -> np.ndarray:
        """LLaVA's signed lengths: + for image rows, - for text-only (text-size proxy)."""
        return np.where(self.has_image, self.text_bytes, -self.text_bytes).astype(np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}, "_group": (-1, None), "_pid": -1}


def _open_file(file: str, kind: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == "parquet":
            return pq.ParquetFile(file)
        source = pa.memory_map(file)
        try:  # datasets writes the Arrow stream format; the file format is read as well
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowException) as err:
        raise RecordFormatError(f"{file}: cannot be read as {kind} ({err})") from None


def _build(files: list[str], kind: str) -> dict[str, np.ndarray]:
    """One pass over the files' text and image columns: the arrays `ArrowSource` keeps."""
    bounds, pieces, has_image, text_bytes = [0], [], [], []
    for number, file in enumerate(files):
        handle = _open_file(file, kind)
        groups = range(handle.num_row_groups) if kind == "parquet" else [0]
        names = handle.schema_arrow.names if kind == "parquet" else handle.schema.names
        texts, images = _columns(file, names)
        for group in groups:
            columns = [*texts, *images]
            table = handle.read_row_group(group, columns=columns) if kind == "parquet" \
                else handle.select(columns)
            sizes = [_leaves(table.column(name), _text_size, sum) for name in texts]
            # A pair's longer row: the prompt and the longer reply (one text: its size).
            longer_reply = np.maximum(sizes[1], sizes[2]) if len(sizes) == 3 else 0
            text_bytes.append(sizes[0] + longer_reply)
            flags = [_leaves(table.column(name), _present, max) > 0 for name in images]
            has_image.append(np.logical_or.reduce(flags) if flags
                             else np.zeros(table.num_rows, dtype=bool))
            bounds.append(bounds[-1] + table.num_rows)
            pieces.append((number, group))
    return {"bounds": np.asarray(bounds, dtype=np.int64),
            "pieces": np.asarray(pieces, dtype=np.int64).reshape(-1, 2),
            "has_image": np.concatenate(has_image) if has_image else np.zeros(0, bool),
            "text_bytes": np.concatenate(text_bytes).astype(np.int64) if text_bytes
            else np.zeros(0, np.int64)}


def _columns(file: str, names: list[str]) -> tuple[list[str], list[str]]:
    """(text columns, image columns) of a table: its conversation column, or a preference
    table's prompt column then its two reply columns; the image column and RLAIF-V's
    `image_path` (a path kept beside the image bytes)."""
    images = [name for name in (image_column(names), "image_path") if name in names]
    replies = next((pair for pair in REPLY_COLUMNS if set(pair) <= set(names)), None)
    if replies is not None:
        prompt = next((n for n in PROMPT_COLUMNS if n in names), None)
        if prompt is None:
            raise RecordFormatError(f"{file}: preference columns {' and '.join(replies)} but "
                                    f"no prompt column (columns: {', '.join(names)}); give "
                                    "`conversations`, `prompt` or `question`")
        return [prompt, *replies], images
    text = next((n for n in TEXT_COLUMNS if n in names), None)
    if text is None:
        raise RecordFormatError(f"{file}: no conversations or preference columns (columns: "
                                f"{', '.join(names)}); give {LAYOUTS}")
    return [text], images


def _leaves(column: Any, leaf: Any, combine: Any) -> np.ndarray:
    """Per row, `leaf` of every value nested in `column`, summed over lists and combined
    over a struct's fields by `combine` (sum: text sizes; max: an image struct counts once)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        import pyarrow.compute as pc

        inner = _leaves(array.flatten(), leaf, combine)
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=inner, minlength=len(array)).astype(np.int64)
    if pa.types.is_struct(kind):
        fields = [_leaves(f, leaf, combine) for f in array.flatten()]
        if not fields:
            return np.zeros(len(array), dtype=np.int64)
        return np.asarray(fields[0] if len(fields) == 1 else
                          (np.sum(fields, axis=0) if combine is sum else np.max(fields, axis=0)))
    return leaf(array)


def _text_size(array: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return np.zeros(len(array), dtype=np.int64)
    return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False)


def _present(array: Any) -> np.ndarray:
    """1 where a value is a non-empty path or a non-empty bytes value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if not any(f(kind) for f in (pa.types.is_string, pa.types.is_large_string,
                                 pa.types.is_binary, pa.types.is_large_binary)):
        return np.zeros(len(array), dtype=np.int64)
    lengths = pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False)
    return (lengths > 0).astype(np.int64)

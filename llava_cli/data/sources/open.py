"""One data source from its path, by what is there (never by a folder's name): a LLaVA
JSON/JSONL file, a `datasets.save_to_disk` folder, Parquet file(s), or WebDataset tar
shard(s); a glob (`shards/*.tar`) or a folder holding only one kind names several files."""

from __future__ import annotations

import glob
import os
from typing import Any

from llava_cli.data.records import RecordFormatError, RecordIndex

KINDS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "tar"}
SUPPORTED = ("a LLaVA .json/.jsonl file, a `datasets.save_to_disk` folder, .parquet file(s) "
             "or WebDataset .tar shard(s)")


def open_source(path: str, cache_dir: str | os.PathLike[str] | None = None) -> Any:
    """The index of the source at `path` (see the module doc); `RecordFormatError` names
    what was found when it is none of them."""
    from llava_cli.data.sources.arrow import ArrowSource
    from llava_cli.data.sources.webdataset import TarSource

    path = os.path.abspath(path)
    kind, files = source_files(path)
    if kind == "json":
        return RecordIndex.open(path, cache_dir=cache_dir)
    if kind == "tar":
        return TarSource.open(path, files, cache_dir)
    return ArrowSource.open(path, files, kind, cache_dir)


def source_files(path: str) -> tuple[str, list[str]]:
    """(kind, files) of a source: json, arrow (a save_to_disk folder or .arrow files),
    parquet or tar."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")):
            return "arrow", _saved_arrow_files(path)
        files = sorted(os.path.join(path, name) for name in os.listdir(path))
        files = [f for f in files if os.path.splitext(f)[1].lower() in KINDS]
    elif any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise RecordFormatError(f"data path {path} not found; give {SUPPORTED}")
    kinds = {KINDS.get(os.path.splitext(f)[1].lower(), "json") for f in files}
    if len(files) == 1 and kinds == {"json"}:
        return "json", files
    if len(kinds) != 1 or "json" in kinds:
        found = ", ".join(sorted(kinds)) if files else "nothing"
        raise RecordFormatError(f"{path}: found {found}; a source is {SUPPORTED} (one kind "
                                "per source: list each file as its own source in a mix)")
    return kinds.pop(), files


def _saved_arrow_files(folder: str) -> list[str]:
    """The Arrow files of a `Dataset.save_to_disk` folder, in order, from its state.json."""
    import json

    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordFormatError(f"{folder}/state.json is not a `datasets` save_to_disk state "
                                f"({err}); save the dataset again with save_to_disk") from None
    files = [os.path.normpath(os.path.join(folder, name)) for name in names]
    # A state.json is data: its file names must stay inside the folder it describes.
    if any(os.path.dirname(f) != os.path.normpath(folder) for f in files):
        raise RecordFormatError(f"{folder}/state.json names files outside its folder")
    return files

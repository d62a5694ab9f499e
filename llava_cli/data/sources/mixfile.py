"""Mix files: several data sources, each with a repeat count or a weight, in one file given
where a data path goes (`--data-path mix.yaml`, a recipe's `data_path:`, `inspect-data`).

Two layouts, told apart by their shape: ours (YAML or JSON, `sources:` a list of
`{path, image_folder, repeat | weight, name}` plus an optional `seed`), and InternVL's meta
JSON (`{name: {"root": images, "annotation": file, "repeat_time": r, ...}}`). Relative paths
resolve against the mix file's folder. Every bad entry is one line naming the source, the
field and the fix (`MixError`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

DEFAULT_SEED = 0  # a fixed default: the same mix file always selects the same records
MIX_SUFFIXES = (".yaml", ".yml")
MAX_AMOUNT = 1e9  # a repeat or weight above this is a typo, not a plan
PEEK_LIMIT = 64 << 20  # a .json object larger than this is data, not a mix file
SOURCE_KEYS = ("path", "name", "image_folder", "repeat", "weight")
TOP_KEYS = ("sources", "seed")
# InternVL meta keys: the ones we map, then the ones only InternVL's own loader uses.
INTERNVL_KEYS = ("annotation", "root", "repeat_time")
INTERNVL_IGNORED = ("data_augment", "max_dynamic_patch", "min_dynamic_patch", "length",
                    "split_anno_by_rank", "image_aspect_ratio")


class MixError(ValueError):
    """A mix file that cannot be used; the message names the source and field at fault."""


@dataclass(frozen=True)
class SourceSpec:
    """One source of a mix: where its records are, its images, and how much of it to take
    (`repeat`: copies, <1 a seeded subsample; or `weight`: its share of the mix)."""

    name: str
    path: str
    image_folder: str | None = None
    repeat: float | None = None
    weight: float | None = None


@dataclass(frozen=True)
class MixSpec:
    """A parsed mix file."""

    path: str
    sources: tuple[SourceSpec, ...]
    seed: int = DEFAULT_SEED


def _load(path: str) -> Any:
    """The mix file's content if it is one (by extension, or a .json object of mix shape)."""
    lower = path.lower()
    if lower.endswith(MIX_SUFFIXES):
        with open(path, encoding="utf-8") as f:
            try:
                return yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise MixError(f"{path}: not valid YAML ({err}); fix the mix file") from None
    if not lower.endswith(".json") or not os.path.isfile(path):
        return None
    if os.path.getsize(path) > PEEK_LIMIT:
        return None
    with open(path, "rb") as f:
        if f.read(1 << 12).lstrip(b"\xef\xbb\xbf \t\r\n")[:1] != b"{":
            return None  # a LLaVA .json is a list: not a mix
        f.seek(0)
        try:
            content = json.loads(f.read())
        except ValueError:
            return None  # the record reader reports what is wrong with it
    return content if _mix_shaped(content) else None


def _mix_shaped(content: Any) -> bool:
    if not isinstance(content, dict) or not content:
        return False
    if "sources" in content:
        return True
    return all(isinstance(v, dict) and "annotation" in v for v in content.values())


def is_mix_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a mix file (a .yaml/.yml file, or a .json object shaped as one)."""
    return _load(os.fspath(path)) is not None


def read_mix(path: str | os.PathLike[str]) -> MixSpec:
    """Parse and check the mix file at `path` (raises `MixError`)."""
    path = os.path.abspath(path)
    content = _load(path)
    if not isinstance(content, dict):
        raise MixError(f"{path}: a mix file holds a mapping with 'sources:' (a list of "
                       "{path, repeat | weight, image_folder}) or InternVL's meta layout")
    base = os.path.dirname(path)
    if "sources" in content:
        return _ours(path, base, content)
    return MixSpec(path, tuple(_internvl(path, base, name, entry)
                               for name, entry in content.items()))


def _ours(path: str, base: str, content: dict[str, Any]) -> MixSpec:
    if unknown := sorted(set(content) - set(TOP_KEYS)):
        raise MixError(f"{path}: unknown key {unknown[0]!r}; a mix file has "
                       f"{', '.join(TOP_KEYS)}")
    seed = content.get("seed", DEFAULT_SEED)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise MixError(f"{path}: seed must be a whole number >= 0, got {seed!r}")
    entries = content["sources"]
    if not isinstance(entries, list) or not entries:
        raise MixError(f"{path}: 'sources' must be a non-empty list of "
                       "{path, repeat | weight, image_folder}")
    sources = tuple(_source(path, base, n, entry) for n, entry in enumerate(entries))
    _same_kind(path, sources)
    return MixSpec(path, sources, seed)


def _source(path: str, base: str, n: int, entry: Any) -> SourceSpec:
    where = f"{path}: source #{n}"
    if not isinstance(entry, dict):
        raise MixError(f"{where}: must be a mapping with 'path' (and repeat | weight, "
                       f"image_folder), got {type(entry).__name__}")
    name = entry.get("name", f"#{n}")
    where = f"{path}: source {name!r}"
    if unknown := sorted(set(entry) - set(SOURCE_KEYS)):
        raise MixError(f"{where}: unknown key {unknown[0]!r}; a source has "
                       f"{', '.join(SOURCE_KEYS)}")
    if "repeat" in entry and "weight" in entry:
        raise MixError(f"{where}: give 'repeat' or 'weight', not both")
    return SourceSpec(str(name), _file(where, base, entry.get("path"), "path"),
                      _folder(where, base, entry.get("image_folder"), "image_folder"),
                      _amount(where, entry, "repeat"), _amount(where, entry, "weight"))


def _internvl(path: str, base: str, name: str, entry: dict[str, Any]) -> SourceSpec:
    where = f"{path}: source {name!r}"
    if unknown := sorted(set(entry) - set(INTERNVL_KEYS) - set(INTERNVL_IGNORED)):
        raise MixError(f"{where}: unknown key {unknown[0]!r} for InternVL's meta layout "
                       f"(known: {', '.join(INTERNVL_KEYS + INTERNVL_IGNORED)})")
    return SourceSpec(name, _file(where, base, entry.get("annotation"), "annotation"),
                      _folder(where, base, entry.get("root"), "root"),
                      _amount(where, entry, "repeat_time"))


def _file(where: str, base: str, value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise MixError(f"{where}: '{field}' must name a data file or folder")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if "*" not in full and not os.path.exists(full):
        raise MixError(f"{where}: {field} {value!r} not found (looked at {full}); fix the "
                       "path (relative paths start at the mix file's folder)")
    if os.path.isfile(full) and is_mix_file(full):
        raise MixError(f"{where}: {field} {value!r} is itself a mix file; list its sources "
                       "in this one instead")
    return full


def _folder(where: str, base: str, value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise MixError(f"{where}: '{field}' must be a folder path")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if not os.path.isdir(full):
        raise MixError(f"{where}: {field} {value!r} is not a folder (looked at {full})")
    return full


def _amount(where: str, entry: dict[str, Any], field: str) -> float | None:
    if field not in entry:
        return None
    value = entry[field]
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    meaning = ("a source's share of the mix, relative to the other sources' weights"
               if field == "weight" else "how often the source's records are used; below 1 "
               "takes a seeded subsample")
    if number == 0:
        raise MixError(f"{where}: {field} 0 would drop the source; remove it from the mix "
                       f"instead ({field} is {meaning})")
    if number is None or not math.isfinite(number) or number < 0:
        raise MixError(f"{where}: {field} must be a number > 0 ({meaning}), got {value!r}")
    if number > MAX_AMOUNT:
        raise MixError(f"{where}: {field} {value!r} is above the limit of {MAX_AMOUNT:.0e}; "
                       f"give a smaller {field} ({meaning})")
    return float(number)


def _same_kind(path: str, sources: tuple[SourceSpec, ...]) -> None:
    weighted = [s.name for s in sources if s.weight is not None]
    if weighted and len(weighted) != len(sources):
        other = next(s.name for s in sources if s.weight is None)
        raise MixError(f"{path}: source {other!r} has no 'weight' but {weighted[0]!r} has "
                       "one; give every source a weight, or use repeat counts")

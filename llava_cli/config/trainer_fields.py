"""`transformers.TrainingArguments`' fields — names, types and defaults — read from the
installed transformers' source without importing it.

Importing `TrainingArguments` imports torch and takes 5–15 s; every recipe key, `--set` value
and flag must be checked before that (a typo answers at once). The field declarations in
`training_args.py` are plain dataclass fields whose annotations use a handful of names
(`X | None`, `dict[str, Any]`, transformers' string enums), so they are read with `ast`. The
enums (`IntervalStrategy`, `SchedulerType`, …) are rebuilt from their own class bodies, so a
value they do not hold is refused here as transformers would refuse it. Should a transformers
release change that layout, `trainer_fields` falls back to importing the real class
(slower, never wrong); `tests/config/test_trainer_fields.py` compares both.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import functools
import importlib.util
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

NO_DEFAULT = object()


class TrainerField(NamedTuple):
    """One `TrainingArguments` field: its type (as `config.values.typed` reads it) and default
    (`NO_DEFAULT` for a default factory)."""

    annotation: Any
    default: Any


@functools.cache
def trainer_fields() -> dict[str, TrainerField]:
    """Field name → `TrainerField` for every init field of `TrainingArguments`."""
    try:
        return _from_source()
    except (OSError, SyntaxError, ValueError, LookupError):
        return _from_import()


def _package_dir() -> Path:
    spec = importlib.util.find_spec("transformers")  # finds the package, imports nothing
    if spec is None or spec.origin is None:
        raise LookupError("transformers is not installed")
    return Path(spec.origin).parent


def _classes(path: Path) -> dict[str, ast.ClassDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


SOURCES = ("training_args.py", "trainer_utils.py", "debug_utils.py")
CACHE_VERSION = 1


def _from_source() -> dict[str, TrainerField]:
    """The fields, rebuilt from what `_extract` read (cached on disk by the source files'
    sizes and mtimes: parsing them costs a third of a second, the cache a millisecond)."""
    package = _package_dir()
    extracted = _cached_extract(package)
    enums = {name: enum.Enum(name, members)  # type: ignore[misc]
             for name, members in extracted["enums"].items()}
    names = {**enums, "Any": Any, "Literal": Literal, "None": None}
    fields: dict[str, TrainerField] = {}
    for name, source, default, has_default in extracted["fields"]:
        annotation = _annotation(ast.parse(source, mode="eval").body, names)
        fields[name] = TrainerField(annotation, default if has_default else NO_DEFAULT)
    if len(fields) < 50 or "learning_rate" not in fields:
        raise ValueError("TrainingArguments not found in the expected layout")
    return fields


def _cached_extract(package: Path) -> dict[str, Any]:
    import json
    import os

    from llava_cli.artifacts.files import default_cache_dir, write_text_atomically

    stats = [[name, os.stat(package / name).st_size, os.stat(package / name).st_mtime_ns]
             for name in SOURCES]
    key = [CACHE_VERSION, str(package), stats]
    file = Path(default_cache_dir()) / "trainer_fields.json"
    try:
        cached = json.loads(file.read_text(encoding="utf-8"))
        if cached.get("key") == key:
            return cached
    except (OSError, ValueError, AttributeError):
        pass  # missing or unreadable: read the source again
    extracted = {"key": key, **_extract(package)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(file, json.dumps(extracted))
    except (OSError, TypeError, ValueError):
        pass  # an unwritable cache (or a default JSON cannot hold) costs the next start
    return extracted


def _extract(package: Path) -> dict[str, Any]:
    """From transformers' source: each enum's members, and each init field of
    TrainingArguments as (name, annotation source, default, whether it has one)."""
    classes = _classes(package / "training_args.py")
    enum_nodes = {name: node for path in SOURCES[1:]
                  for name, node in _classes(package / path).items() if _is_enum(node)}
    enum_nodes.update({name: node for name, node in classes.items() if _is_enum(node)})
    members = {name: _members(node) for name, node in enum_nodes.items()}
    enums = {name: enum.Enum(name, values)  # type: ignore[misc]
             for name, values in members.items()}
    fields = []
    for statement in classes["TrainingArguments"].body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        default, init = _default_of(statement.value, enums)
        if init:
            has_default = default is not NO_DEFAULT
            fields.append([statement.target.id, ast.unparse(statement.annotation),
                           default if has_default else None, has_default])
    return {"enums": members, "fields": fields}


def _is_enum(node: ast.ClassDef) -> bool:
    return any(isinstance(base, ast.Name) and base.id in ("ExplicitEnum", "Enum", "str")
               for base in node.bases) and any(isinstance(s, ast.Assign) for s in node.body)


def _members(node: ast.ClassDef) -> dict[str, Any]:
    members = {}
    for statement in node.body:
        if (isinstance(statement, ast.Assign) and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
                and isinstance(statement.value, ast.Constant)):
            members[statement.targets[0].id] = statement.value.value
    return members


def _default_of(value: ast.expr | None, enums: dict[str, type[enum.Enum]]
                ) -> tuple[Any, bool]:
    """(default, is an init field) of `= field(default=…)`, `= field(default_factory=…)`,
    `= field(init=False)` or `= literal`."""
    if value is None:
        return NO_DEFAULT, True
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        keywords = {k.arg: k.value for k in value.keywords}
        init = keywords.get("init")
        if isinstance(init, ast.Constant) and init.value is False:
            return NO_DEFAULT, False
        if "default" in keywords:
            return _literal(keywords["default"], enums), True
        return NO_DEFAULT, True
    return _literal(value, enums), True


def _literal(node: ast.expr, enums: dict[str, type[enum.Enum]]) -> Any:
    """A constant default, an enum member's value (`IntervalStrategy.NO` → "no"), or
    NO_DEFAULT for anything computed."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in enums and node.attr in enums[node.value.id].__members__):
            return enums[node.value.id][node.attr].value
        return NO_DEFAULT


def _annotation(node: ast.expr, names: dict[str, Any]) -> Any:
    """The annotation as a typing object; a class name we do not know reads as Any (its own
    validation decides, in TrainingArguments)."""
    if isinstance(node, ast.Constant):
        return None if node.value is None else Literal[node.value]
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        return {"str": str, "int": int, "float": float, "bool": bool, "dict": dict,
                "list": list}.get(node.id, Any)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _annotation(node.left, names), _annotation(node.right, names)
        for one, other in ((left, right), (right, left)):
            if other is str and isinstance(one, type) and issubclass(one, enum.Enum):
                return one  # transformers turns the text into the enum: only its values pass
        return typing.Union[left, right]  # noqa: UP007 — built from parts at run time
    if isinstance(node, ast.Subscript):
        outer = getattr(node.value, "id", "")
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        args = tuple(_annotation(part, names) for part in inner)
        if outer == "Literal":
            return Literal[tuple(ast.literal_eval(part) for part in inner)]
        if outer in ("dict", "Dict"):
            return dict[args] if len(args) == 2 else dict
        if outer in ("list", "List"):
            return list[args[0]]
        if outer == "Optional":
            return typing.Optional[args[0]]  # noqa: UP045
        if outer == "Union":
            return typing.Union[args]  # noqa: UP007
    return Any


def _from_import() -> dict[str, TrainerField]:
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: TrainerField(hints.get(f.name, Any),
                                 f.default if f.default is not dataclasses.MISSING
                                 else NO_DEFAULT)
            for f in dataclasses.fields(TrainingArguments) if f.init}

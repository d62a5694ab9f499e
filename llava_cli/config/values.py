"""Reading each configuration value by the type of the field it is for.

Recipes are read with every scalar kept as the text the user wrote (YAML's BaseLoader) and
`--set` values arrive as text, so nothing is guessed before the field is known: `save_strategy:
no` stays the string "no" (YAML 1.1 would make it False), `run_name: 1e5` stays "1e5",
`max_steps: 4e0` and `seed: 1.5` are errors for integer fields, `bf16: maybe` is an error,
and numbers inside a dict-valued field (`lr_scheduler_kwargs: {min_lr: 1e-6}`) are numbers.
"""

from __future__ import annotations

import enum
import re
import types
import typing
from typing import Any

import yaml

_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\.\d+|\d+(\.\d*)?)([eE][-+]?\d+)?|[-+]?(inf|Infinity|\.inf)|nan|NaN")
TRUE, FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}
NULLS = {"null", "~", "Null", "NULL"}


class ValueTypeError(ValueError):
    """A value that its field's type cannot take; the message says what it needs."""


def read_yaml_text(text: str) -> Any:
    """YAML with every scalar left as its text (containers kept)."""
    return yaml.load(text, Loader=yaml.BaseLoader)


def infer(value: Any) -> Any:
    """YAML 1.2 core typing for values no field describes (inside dicts): true/false, null,
    integers and floats (`1e-6` too); anything else stays text. Containers recursively."""
    if isinstance(value, dict):
        return {k: infer(v) for k, v in value.items()}
    if isinstance(value, list):
        return [infer(v) for v in value]
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value in NULLS:
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def typed(value: Any, annotation: Any, key: str) -> Any:
    """`value` (text, or already typed) as a value of `annotation`; ValueTypeError if it
    cannot be one."""
    options = _options(annotation)
    if isinstance(value, str) and (value in NULLS or value == "") and type(None) in options:
        return None  # `key:` with nothing after it is null, as YAML means it
    errors = []
    for option in sorted(options, key=_preference):
        if option is type(None):
            continue
        try:
            return _as(value, option, key)
        except ValueTypeError as err:
            errors.append(str(err))
    if value is None and type(None) in options:
        return None
    raise ValueTypeError(errors[0] if len(errors) == 1 else
                         f"{key}: {value!r} is not a valid value ({'; '.join(errors)})")


def _options(annotation: Any) -> set[Any]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return set(typing.get_args(annotation))
    return {annotation}


def _preference(option: Any) -> int:
    """Containers before scalars before text: `report_to: [a, b]` is a list, `deepspeed: {...}`
    a dict, and text is the last resort of a `X | str` field."""
    origin = typing.get_origin(option) or option
    if origin in (dict, list):
        return 0
    return 2 if option is str else 1


def _as(value: Any, option: Any, key: str) -> Any:
    origin = typing.get_origin(option) or option
    if origin is typing.Literal:
        return _literal(value, typing.get_args(option), key)
    if option is Any:
        return infer(value)
    if option is bool:
        return _bool(value, key)
    if option is int:
        return _int(value, key)
    if option is float:
        return _float(value, key)
    if option is str:
        if isinstance(value, dict | list):
            raise ValueTypeError(f"{key}: expected text, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if isinstance(option, type) and issubclass(option, enum.Enum):
        return value if isinstance(value, option) else _enum(value, option, key)
    if origin in (dict, list):
        return _container(value, origin, typing.get_args(option), key)
    return value  # a type we do not read ourselves: its own validation decides


def _literal(value: Any, choices: tuple[Any, ...], key: str) -> Any:
    for choice in choices:
        if value == choice or (isinstance(value, str) and str(choice) == value):
            return choice
    raise ValueTypeError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in TRUE | FALSE:
        return value.lower() in TRUE
    raise ValueTypeError(f"{key}: expected true or false, got {value!r}")


def _int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    raise ValueTypeError(f"{key}: expected a whole number, got {value!r}")


def _float(value: Any, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value.strip().replace(".inf", "inf").replace("Infinity", "inf"))
    raise ValueTypeError(f"{key}: expected a number, got {value!r}")


def _enum(value: Any, option: type[enum.Enum], key: str) -> Any:
    names = [member.value for member in option]
    if isinstance(value, str) and value in names:
        return value
    raise ValueTypeError(f"{key}: {value!r} is not one of {', '.join(map(str, names))}")


def _container(value: Any, origin: type, args: tuple[Any, ...], key: str) -> Any:
    if isinstance(value, str):
        try:
            value = read_yaml_text(value)
        except yaml.YAMLError as err:
            raise ValueTypeError(f"{key}: {value!r} is not valid YAML ({err})") from None
    if origin is dict and isinstance(value, dict):
        inner = args[1] if len(args) == 2 else Any
        return {k: typed(v, inner, f"{key}.{k}") for k, v in value.items()}
    if origin is list and isinstance(value, list):
        inner = args[0] if args else Any
        return [typed(v, inner, f"{key}[{n}]") for n, v in enumerate(value)]
    raise ValueTypeError(f"{key}: expected a {origin.__name__}, got {value!r}")

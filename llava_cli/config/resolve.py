"""From what the user typed to one validated `RunConfig`: stage preset < recipe YAML <
`--set key=value` (and the original scripts' arguments, which `cli.main` turns into `--set`) <
named flags, with LLaVA's and InternVL's argument names (`config.original_args`) and any
`transformers.TrainingArguments` field accepted (the latter kept in `training_args`)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llava_cli.config.declared import stage_layer
from llava_cli.config.original_args import in_original_order, original_names
from llava_cli.config.run_config import ConfigError, RunConfig
from llava_cli.config.starting_model import own_feature_settings
from llava_cli.config.trainer_fields import trainer_fields
from llava_cli.config.training_checks import refuse_missing_reporters
from llava_cli.config.values import read_yaml_text, typed


def training_argument_types() -> dict[str, Any]:
    """Field name → type of `transformers.TrainingArguments`, read from its source (no import:
    a typo answers at once; `config.trainer_fields`)."""
    return {name: field.annotation for name, field in trainer_fields().items()}


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` items → a dict of texts, read later by each field's type."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set learning_rate=2e-5")
        out[key.strip()] = _unquoted(raw.strip())
    return out


def _unquoted(raw: str) -> str:
    """A YAML-quoted text (`"no"`, `'1e5'`), the usual way to keep a value text, as its text;
    anything else as typed."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw
        if isinstance(value, str):
            return value
    return raw


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file (a mapping of configuration keys)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    try:
        data = read_yaml_text(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"recipe {str(path)!r} is not a text file (a YAML recipe is UTF-8 "
                          "text)") from None
    except RecursionError:
        raise ConfigError(f"recipe {str(path)!r} is nested too deeply to read") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of key: value")
    return data


def _place(key: str, value: Any, out: dict[str, Any], source: str,
           train_types: dict[str, Any], unknown: list[str], aliased: bool = False) -> None:
    """Put one user key where it belongs, read by its field's type: an original LLaVA/InternVL
    name (first: `image_grid_pinpoints` is ours too, but LLaVA writes it as a Python text),
    our field, or a TrainingArguments field; a key nothing knows goes to `unknown`."""
    aliases = original_names()
    try:
        if key in aliases and not aliased:
            for k, v in aliases[key](value).items():
                _place(k, v, out, source, train_types, unknown, aliased=True)
        elif key in RunConfig.model_fields and key != "training_args":
            out[key] = typed(value, RunConfig.model_fields[key].annotation, key)
        elif key in train_types:
            out.setdefault("training_args", {})[key] = typed(value, train_types[key], key)
        elif key == "training_args" and isinstance(value, dict):
            for k, v in value.items():
                _place(k, v, out, source, train_types, unknown)
        else:
            unknown.append(key)
    except ConfigError:
        raise  # from a nested key: already says where
    except ValueError as err:  # ValueTypeError, or a value an original name refuses
        raise ConfigError(f"{err} (from {source})") from None


def _refuse_unknown(keys: list[str], source: str, names: list[str]) -> None:
    """One error naming every key nothing knows, each with its closest valid name."""
    if not keys:
        return
    described = []
    for key in keys:
        close = difflib.get_close_matches(key, [*RunConfig.model_fields, *names], n=1)
        described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    plural = "s" if len(keys) > 1 else ""
    raise ConfigError(f"unknown configuration key{plural} {', '.join(described)} (from "
                      f"{source}); see `--help`, or any transformers.TrainingArguments field")


def place_keys(layer: dict[str, Any], source: str,
               train_types: dict[str, Any] | None = None) -> dict[str, Any]:
    """One layer's keys as our configuration keys (TrainingArguments fields under
    `training_args`), each read by its field's type; every unknown key in one error."""
    train_types = training_argument_types() if train_types is None else train_types
    placed: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in in_original_order(layer.items()):
        _place(key, value, placed, source, train_types, unknown)
    _refuse_unknown(unknown, source, [*original_names(), *train_types])
    return placed


def resolve_config(command: str, recipe: str | Path | None = None,
                   sets: list[str] | None = None, flags: dict[str, Any] | None = None,
                   ) -> RunConfig:
    """Merge stage preset < recipe < `--set` < named flags and validate once.

    Named flags whose value is None were not given and do not override anything.
    """
    train_types = training_argument_types()
    merged: dict[str, Any] = {}
    layers = [(stage_layer(command), f"the {command} defaults")]
    if recipe is not None:
        layers.append((load_recipe(recipe), f"recipe {str(recipe)!r}"))
    layers.append((parse_set(sets), "--set or the command line"))
    layers.append(({k: v for k, v in (flags or {}).items() if v is not None}, "a flag"))
    for layer, source in layers:
        placed = place_keys(layer, source, train_types)
        args = {**merged.get("training_args", {}), **placed.pop("training_args", {})}
        merged.update(placed)
        merged["training_args"] = args
    try:
        config = _with_model_features(RunConfig.model_validate(merged))
        # Here, not in the model: a saved configuration read back elsewhere (merge-lora on
        # another machine) need not have the reporter installed.
        refuse_missing_reporters(config.training_args.get("report_to"))
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
    except ValueError as err:
        raise ConfigError(f"invalid configuration:\n  {err}") from None
    return config


def _with_model_features(config: RunConfig) -> RunConfig:
    """`config` showing the starting model's own feature settings where none was given (a
    checkpoint keeps its own: `model.start`); what was given stays marked as given."""
    given = set(config.model_fields_set)
    own = {key: value for key, value in own_feature_settings(config.model_name_or_path).items()
           if key not in given}
    if not own:
        return config
    values = {**dict(config), **own}
    RunConfig.model_validate(values)  # the model's values are valid settings too
    return RunConfig.model_construct(_fields_set=given, **values)


def _explain(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        message = problem["msg"].removeprefix("Value error, ")
        if not problem["loc"]:  # a check across keys: its message names them
            lines.append(message)
            continue
        key = ".".join(str(p) for p in problem["loc"])
        lines.append(f"{key}: {message} (got {problem.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)

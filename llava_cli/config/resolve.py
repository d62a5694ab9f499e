"""From what the user typed to one validated `RunConfig`: stage preset < recipe YAML <
`--set key=value` < named flags, with LLaVA's own argument names and any
`transformers.TrainingArguments` field accepted (the latter kept in `training_args`)."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from llava_cli.config.run_config import ConfigError, RunConfig, refuse_missing_reporters
from llava_cli.config.values import TRUE, ValueTypeError, read_yaml_text, typed

# Stage presets: what each command means before any recipe or flag.
STAGE_PRESETS: dict[str, dict[str, Any]] = {
    # image_aspect_ratio square: LLaVA-1.5's stage 1 (its pretrain.sh passes none, so square)
    "pretrain": {"template": "plain", "train_vision_tower": "frozen", "train_projector": "full",
                 "train_llm": "frozen", "image_aspect_ratio": "square"},
    "finetune": {"train_vision_tower": "frozen", "train_projector": "full", "train_llm": "full"},
    "lora": {"train_vision_tower": "frozen", "train_projector": "full", "train_llm": "lora",
             "lora_r": 128, "lora_alpha": 256, "projector_lr": 2e-5,
             "training_args": {"learning_rate": 2e-4}},
    "inspect-data": {},
}


def _true(value: Any) -> bool:
    return value is True or value == 1 or (isinstance(value, str) and value.lower() in TRUE)


# LLaVA's own argument names, so LLaVA users can bring their scripts' settings.
def _llava_aliases() -> dict[str, Any]:
    return {
        "version": lambda v: {"template": v},
        "mm_projector_lr": lambda v: {"projector_lr": v},
        "mm_vision_tower_lr": lambda v: {"vision_tower_lr": v},
        "mm_vision_select_layer": lambda v: {"vision_select_layer": v},
        "mm_vision_select_feature": lambda v: {"vision_select_feature": v},
        "mm_projector_type": lambda v: {"projector_type": v},
        "mm_vision_tower": lambda v: {"vision_tower": v},
        "pretrain_mm_mlp_adapter": lambda v: {"pretrained_projector": v},
        "tune_mm_mlp_adapter": lambda v: (
            {"train_llm": "frozen", "train_projector": "full"} if _true(v) else {}),
        # the original's model.model.requires_grad_(False): the decoder, not lm_head
        "freeze_backbone": lambda v: (
            {"train_llm": "frozen", "train_lm_head": "full"} if _true(v) else {}),
        # issue 15 (trainability): InternVL's name, onto the tower-parts declaration
        "tune_vit_pos_embedding": lambda v: (
            {"train_vision_tower": "position_embedding"} if _true(v) else {}),
        "freeze_mm_mlp_adapter": lambda v: {"train_projector": "frozen"} if _true(v) else {},
        "unfreeze_mm_vision_tower": lambda v: {"train_vision_tower": "full"} if _true(v) else {},
        "lora_enable": lambda v: {"train_llm": "lora"} if _true(v) else {},
        "lora_weight_path": lambda v: {},  # never used by LLaVA's train.py
        "lazy_preprocess": lambda v: {},  # always lazy here
        "is_multimodal": lambda v: {},
        "mm_use_im_patch_token": lambda v: _refuse_true("mm_use_im_patch_token", v),
        "mm_use_im_start_end": lambda v: _refuse_true("mm_use_im_start_end", v),
    }


def _refuse_true(name: str, value: Any) -> dict[str, Any]:
    if _true(value):
        raise ConfigError(f"{name}: true is not supported (LLaVA-1.5 and the llava-hf format use "
                          "no image start/end or patch tokens); remove it or set it to false")
    return {}


def training_argument_types() -> dict[str, Any]:
    """Field name → type of `transformers.TrainingArguments` (imports transformers lazily)."""
    import dataclasses
    import typing

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments)
            if f.init}


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`--set key=value` items → a dict of texts, read later by each field's type."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set learning_rate=2e-5")
        out[key.strip()] = raw.strip()
    return out


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
           train_types: dict[str, Any]) -> None:
    """Put one user key where it belongs, read by its field's type: our field, a LLaVA alias,
    or a TrainingArguments field."""
    aliases = _llava_aliases()
    try:
        if key in RunConfig.model_fields and key != "training_args":
            out[key] = typed(value, RunConfig.model_fields[key].annotation, key)
        elif key in aliases:
            for k, v in aliases[key](value).items():
                _place(k, v, out, source, train_types)
        elif key in train_types:
            out.setdefault("training_args", {})[key] = typed(value, train_types[key], key)
        elif key == "training_args" and isinstance(value, dict):
            for k, v in value.items():
                _place(k, v, out, source, train_types)
        else:
            _unknown(key, source, [*aliases, *train_types])
    except ValueTypeError as err:
        raise ConfigError(f"{err} (from {source})") from None


def _unknown(key: str, source: str, names: list[str]) -> None:
    """The error for a key nothing knows, with the closest valid name."""
    close = difflib.get_close_matches(key, [*RunConfig.model_fields, *names], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown configuration key {key!r} (from {source}){hint}")


def resolve_config(command: str, recipe: str | Path | None = None,
                   sets: list[str] | None = None, flags: dict[str, Any] | None = None,
                   ) -> RunConfig:
    """Merge stage preset < recipe < `--set` < named flags and validate once.

    Named flags whose value is None were not given and do not override anything.
    """
    train_types = training_argument_types()
    merged: dict[str, Any] = {}
    layers = [(STAGE_PRESETS.get(command, {}), f"the {command} preset")]
    if recipe is not None:
        layers.append((load_recipe(recipe), f"recipe {str(recipe)!r}"))
    layers.append((parse_set(sets), "--set"))
    layers.append(({k: v for k, v in (flags or {}).items() if v is not None}, "a flag"))
    for layer, source in layers:
        placed: dict[str, Any] = {}
        for key, value in layer.items():
            _place(key, value, placed, source, train_types)
        args = {**merged.get("training_args", {}), **placed.pop("training_args", {})}
        merged.update(placed)
        merged["training_args"] = args
    try:
        config = RunConfig.model_validate(merged)
        # Here, not in the model: a saved configuration read back elsewhere (merge-lora on
        # another machine) need not have the reporter installed.
        refuse_missing_reporters(config.training_args.get("report_to"))
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None
    except ValueError as err:
        raise ConfigError(f"invalid configuration:\n  {err}") from None
    return config


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

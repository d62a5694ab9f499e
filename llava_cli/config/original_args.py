"""The original LLaVA / InternVL `train.py` arguments, accepted as their scripts write them.

Two things live here, and only here:

- `original_names()`: the one table from LLaVA's and InternVL's argument names (ModelArguments,
  DataArguments and their TrainingArguments subclass) onto our configuration keys, including
  the names we accept as no-ops (each with the note a run prints) and the values we refuse
  because they would change training silently.
- `normalise_argv()`: a pure function turning an original command line (`--snake_case VALUE`,
  `--flag=value`, `True`/`False`) into one our Typer commands read: our own options stay as
  they are, `--bf16 True` becomes `--bf16`, and every other `--name value` becomes
  `--set name=value`, so it goes through the same typed reading as a recipe key.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from typing import Any

from llava_cli.config.values import FALSE, TRUE

Mapper = Callable[[Any], dict[str, Any]]


def is_true(value: Any) -> bool:
    """True, 1, or a text meaning true (`True`, `yes`, …)."""
    return value is True or value == 1 or (isinstance(value, str) and value.lower() in TRUE)


def original_names() -> dict[str, Mapper]:
    """Original argument name → the configuration keys it means (a mapper may raise
    ValueError for a value we refuse)."""
    names: dict[str, Mapper] = {name: lambda v: {} for name in accepted_notes()}
    for name in ("lazy_preprocess", "is_multimodal", "mm_use_im_patch_token"):
        names[name] = _boolean_no_op(name)  # `--lazy_preprocess recipe.yaml` is a mistake
    names.update({
        "version": lambda v: {"template": v},
        "mm_projector_lr": lambda v: {"projector_lr": v},
        "mm_vision_tower_lr": lambda v: {"vision_tower_lr": v},
        "mm_vision_select_layer": lambda v: {"vision_select_layer": v},
        "mm_vision_select_feature": lambda v: {"vision_select_feature": v},
        "mm_projector_type": lambda v: {"projector_type": v},
        "mm_vision_tower": lambda v: {"vision_tower": v},
        "pretrain_mm_mlp_adapter": lambda v: {"pretrained_projector": v},
        # LLaVA: everything frozen but the projector; InternVL's freeze_llm does the same.
        "tune_mm_mlp_adapter": _when_true({"train_llm": "frozen", "train_projector": "full",
                                           "train_lm_head": "frozen",
                                           "train_vision_tower": "frozen"}),
        "freeze_llm": _when_true({"train_llm": "frozen"}),
        # the original's model.model.requires_grad_(False): the decoder, not lm_head
        "freeze_backbone": _when_true({"train_llm": "frozen", "train_lm_head": "full"}),
        "freeze_mm_mlp_adapter": _when_true({"train_projector": "frozen"}),
        "unfreeze_mm_vision_tower": _when_true({"train_vision_tower": "full"}),
        # get_peft_model freezes all but the adapters (lm_head too, after freeze_backbone)
        "lora_enable": _when_true({"train_llm": "lora", "train_lm_head": "frozen"}),
        "evaluation_strategy": lambda v: {"eval_strategy": v},  # transformers 5's name
        "image_grid_pinpoints": lambda v: {"image_grid_pinpoints": _pinpoints(v)},
        "mm_use_im_start_end": lambda v: {"mm_use_im_start_end": v},
        # InternVL's name, onto the tower-parts declaration (`model.parts`)
        "tune_vit_pos_embedding": _when_true({"train_vision_tower": "position_embedding"}),
        "mm_patch_merge_type": _only("mm_patch_merge_type", "flat"),
    })
    return names


# The original's trainability switches act in its train.py's code order, each overriding what
# came before (freeze_backbone, then LoRA, then tune_mm_mlp_adapter's requires_grad_(False) of
# everything but the projector, then the projector and tower switches); so, within one source,
# they are applied in this order whatever order a script writes them in.
TRAINABILITY_ORDER = ("freeze_backbone", "freeze_llm", "lora_enable", "tune_mm_mlp_adapter",
                      "freeze_mm_mlp_adapter", "tune_vit_pos_embedding",
                      "unfreeze_mm_vision_tower")


def in_original_order(items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """`items` with the trainability switches last, in `TRAINABILITY_ORDER` (stable)."""
    def rank(item: tuple[str, Any]) -> int:
        key = item[0]
        return TRAINABILITY_ORDER.index(key) + 1 if key in TRAINABILITY_ORDER else 0
    return sorted(items, key=rank)


def accepted_notes() -> dict[str, str]:
    """Original names accepted with no effect here, and why (printed once per run)."""
    return {
        "lazy_preprocess": "records are always read lazily here",
        "is_multimodal": "set by the original itself when a vision tower is given",
        "mm_use_im_patch_token": "no <im_patch> token is added (the original adds it to the "
        "vocabulary, LLaVA's default True, but never writes it into a prompt)",
        "cache_dir": "models load from the Hugging Face cache; set HF_HOME to move it",
        "mpt_attn_impl": "only for MPT models; attention is attn_implementation here",
        "lora_weight_path": "the original never reads it",
        "mm_patch_merge_type": "flat is the only merge (no anyres feature merging)",
    }


def _when_true(keys: dict[str, Any]) -> Mapper:
    return lambda value: dict(keys) if is_true(value) else {}


def _boolean_no_op(name: str) -> Mapper:
    def mapper(value: Any) -> dict[str, Any]:
        if not isinstance(value, bool) and str(value).lower() not in TRUE | FALSE:
            raise ValueError(f"{name} {value!r}: expected True or False")
        return {}
    return mapper


def _only(name: str, accepted: str) -> Mapper:
    def mapper(value: Any) -> dict[str, Any]:
        if value != accepted:
            raise ValueError(f"{name} {value!r}: only {accepted!r} is supported; remove it")
        return {}
    return mapper


def _pinpoints(value: Any) -> Any:
    """LLaVA-NeXT's and InternVL's string form, "[(336, 672), (672, 336)]", as a list of
    [height, width] pairs; anything else (a YAML list, `null`) is left to the field's type."""
    if not isinstance(value, str) or "(" not in value:
        return value
    try:
        pairs = ast.literal_eval(value)
        return [[int(a), int(b)] for a, b in pairs]
    except (ValueError, TypeError, SyntaxError):
        raise ValueError(f"image_grid_pinpoints {value!r}: expected pairs like "
                         "\"[(336, 672), (672, 336)]\"") from None


def notes_for(keys: Iterable[str]) -> list[str]:
    """The notes for the accepted no-op names among `keys`, each once, in order."""
    notes, seen = accepted_notes(), set()
    out = []
    for key in keys:
        if key in notes and key not in seen:
            seen.add(key)
            out.append(f"{key}: accepted, no effect: {notes[key]}")
    return out


class OptionSpec:
    """What a command's own options are: spellings that take a value, and switches with their
    `--no-` counterpart (both read off the Typer/click command)."""

    def __init__(self, valued: Iterable[str], switches: dict[str, str | None]) -> None:
        self.valued = set(valued)
        self.switches = dict(switches)

    @classmethod
    def of(cls, command: Any) -> OptionSpec:
        """From a click command: every option's spellings."""
        valued: list[str] = []
        switches: dict[str, str | None] = {"--help": None, "-h": None}
        for param in getattr(command, "params", []):
            opts = list(getattr(param, "opts", []))
            if not any(o.startswith("-") for o in opts):
                continue  # a positional argument
            if getattr(param, "is_flag", False):
                secondary = list(getattr(param, "secondary_opts", []) or [])
                switches.update(dict.fromkeys(secondary))  # `--no-bf16` is ours too
                switches.update({o: next(iter(secondary), None) for o in opts})
            else:
                valued.extend(opts)
        return cls(valued, switches)


def normalise_argv(args: list[str], ours: OptionSpec) -> list[str]:
    """The arguments after a training command, with the original spellings turned into ours.

    `--name value` / `--name=value` where `--name` is not one of our options → `--set
    name=value` (dashes in the name read as underscores, as HfArgumentParser allows); a bare
    `--name` (followed by another option or nothing) means `true`, as in HfArgumentParser; one of
    our switches followed by `True`/`False` → the switch or its `--no-` form. Everything else
    (our options with their values, positional arguments, what follows `--`) is unchanged.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == "--":
            return out + args[i:]
        if not arg.startswith("--"):
            out.append(arg)
            i += 1
            continue
        name, eq, inline = arg.partition("=")
        if name in ours.valued:
            taken = [arg] if eq or following is None else [arg, following]
            out += taken
            i += len(taken)
        elif name in ours.switches and (eq or _is_boolean(following)):
            value = inline if eq else str(following)
            out += _switch(name, value, ours.switches[name])
            i += 1 if eq else 2
        elif name in ours.switches:
            out.append(arg)
            i += 1
        else:
            value, used = _value(eq, inline, following)
            out += ["--set", f"{name[2:].replace('-', '_')}={value}"]
            i += used
    return out


def _is_boolean(text: str | None) -> bool:
    return text is not None and text.lower() in TRUE | FALSE


def _switch(name: str, value: str, negative: str | None) -> list[str]:
    """`--bf16 True` → `--bf16`; `--bf16 False` → `--no-bf16` (a switch without a `--no-`
    form goes through `--set`, where its value is read by type)."""
    if negative is None:
        return ["--set", f"{name[2:].replace('-', '_')}={value}"]
    return [name] if is_true(value) else [negative]


def _value(eq: str, inline: str, following: str | None) -> tuple[str, int]:
    """An original argument's value and how many words it took (HfArgumentParser: a value
    is any next word that is not an option; none means true)."""
    if eq:
        return inline, 1
    if following is not None and not following.startswith("--"):
        return following, 2
    return "true", 1


def split_original_pairs(args: list[str]) -> list[tuple[str, str]]:
    """A script's train.py arguments as (name, value) pairs, read as HfArgumentParser reads
    them (`--name value`, `--name=value`, a bare `--name` is true); a word that belongs to no
    name is a ValueError."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"{arg!r} follows no --name (one value per argument; give a list "
                             "as one quoted YAML text, e.g. --report_to '[wandb, tensorboard]')")
        name, eq, inline = arg.partition("=")
        value, used = _value(eq, inline, args[i + 1] if i + 1 < len(args) else None)
        pairs.append((name[2:].replace("-", "_"), value))
        i += used
    return pairs

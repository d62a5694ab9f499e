"""Our LLaVA (stock `LlavaForConditionalGeneration`) built from an original-layout checkpoint
(`artifacts.original_layout`): its vision tower resolved, its tokenizer given the `<image>`
token the original does without, its processor serving as it trained, every tensor placed
strictly (a key left over or missing is an error, never a random weight).

A LoRA run is merged into its base as the original's `load_pretrained_model` does
(`W + alpha/r · B A` for every adapted Linear), so what comes out is a full model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import OriginalBase
from llava_cli.artifacts.original_layout import (
    MM_PROJECTOR_FILE,
    NON_LORA_FILE,
    ORIGINAL_FEATURES,
    OriginalCheckpoint,
    Parts,
    adapter_key_to_ours,
    projector_of_non_lora,
    read_state,
    split_original,
    text_config,
    to_ours,
)
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG, ADAPTER_FILE, read_projector_file
from llava_cli.data.text.chat_template import attach_chat_template
from llava_cli.data.text.stops import set_generation_stops
from llava_cli.data.text.tokenizer import IMAGE_TOKEN, add_llava_tokens, load_tokenizer
from llava_cli.model.load import TWO_TOWER_EXTRAS, load_pretrained, torch_dtype
from llava_cli.model.vision import (
    build_processor,
    has_cls_token,
    match_image_policy,
    tower_positions,
    vision_config_of,
    vision_model_class,
)


@dataclass
class Converted:
    """A model built from an original checkpoint, its processor, and where it came from."""

    model: Any
    processor: Any
    base: OriginalBase
    image_aspect_ratio: str


def resolve_local(name: str, near: Path, what: str, flag: str) -> str:
    """`name` as an existing local folder: as given, else next to (or inside) the checkpoint
    `near`; never the hub (a name such as openai/clip-vit-large-patch14-336 is the user's to
    supply: `flag`)."""
    for candidate in (Path(name), near / name, near.parent / name):
        if name and candidate.is_dir() and (candidate / "config.json").is_file():
            return str(candidate.resolve())
    raise ValueError(f"{near}: the {what} {name!r} it names is not a local folder (looked as "
                     f"given, in {near} and in {near.parent}); pass {flag} PATH")


def tower_of(original: OriginalCheckpoint, vision_tower: str | None) -> str:
    """The vision tower folder: `vision_tower` when given, else `mm_vision_tower` resolved."""
    if vision_tower:
        if not (Path(vision_tower) / "config.json").is_file():
            raise ValueError(f"--vision-tower {vision_tower!r} is not a local model folder "
                             "(no config.json); pass the CLIP folder the checkpoint was "
                             "trained with")
        return str(Path(vision_tower).resolve())
    return resolve_local(original.vision_tower_name, original.folder,
                         "vision tower (mm_vision_tower)", "--vision-tower")


def base_of(original: OriginalCheckpoint, base: str | None) -> str | None:
    """The base LLM of a projector or LoRA run: only ever the user's `--base` (an adapter on
    other weights than it was trained on would be silently wrong); None for a full model."""
    if original.kind == "full":
        if base:
            raise ValueError(f"--base {base}: {original.folder} is a full model; drop --base")
        return None
    if not base:
        raise ValueError(f"{original.folder} is an original {original.kind} run on the LLM "
                         f"{original.base_name!r}: pass --base PATH (that LLM's folder)")
    return resolve_local(base, original.folder, "base LLM", "--base")


def build_from_original(original: OriginalCheckpoint, vision_tower: str | None = None,
                        base: str | None = None, template: str = "v1",
                        dtype: str | None = None) -> Converted:
    """Our model + processor from an original `full` checkpoint, or from a `lora` /
    `projector` run on `base`; `template` is the conversation template it was trained with
    (the original does not record it: LLaVA-1.5's is v1)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    tower = tower_of(original, vision_tower)
    llm_folder = base_of(original, base)
    tokenizer = _tokenizer(llm_folder or str(original.folder))
    vision_config = vision_config_of(tower)
    _check_hidden(original, vision_config)
    has_cls = has_cls_token(vision_config)
    feature = original.config.get("mm_vision_select_feature", "patch")
    strategy = ORIGINAL_FEATURES[feature] if has_cls else "full"
    text = text_config(original.config)
    config = LlavaConfig(
        vision_config=vision_config.to_dict(), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=original.config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        image_seq_length=tower_positions(vision_config) - int(strategy == "default"),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)))
    config.text_config.vocab_size = len(tokenizer)
    config.pad_token_id = config.text_config.pad_token_id = tokenizer.pad_token_id
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is replaced below (strictly): no random init
        model = LlavaForConditionalGeneration(config).to(torch_dtype(dtype))
    parts = _parts(original, tower, llm_folder, vision_config)
    _add_rows(parts, len(tokenizer))
    _place(model, to_ours(parts), original.folder)
    folder = Path(llm_folder or original.folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    set_generation_stops(model.generation_config, tokenizer, template)
    aspect = original.config.get("image_aspect_ratio", "square")
    processor = build_processor(tower, vision_config, tokenizer, strategy, has_cls)
    match_image_policy(processor, aspect)
    attach_chat_template(processor, template)
    recorded = OriginalBase(path=str(original.folder.resolve()), kind=original.kind,
                            vision_tower=tower, llm=llm_folder)
    return Converted(model.eval(), processor, recorded, aspect)


def _tokenizer(folder: str) -> Any:
    """The run's tokenizer with `<image>` added; pad = unk where it has no pad, as the
    original's v1 training set it (so only the one image row is new)."""
    import logging

    # AutoTokenizer also reads config.json, whose `llava_llama` transformers does not know:
    # its warning about that is no news (only the tokenizer files are used here).
    logger = logging.getLogger("transformers.configuration_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        tokenizer = load_tokenizer(folder)
    finally:
        logger.setLevel(level)
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    add_llava_tokens(tokenizer)
    return tokenizer


def _check_hidden(original: OriginalCheckpoint, vision_config: Any) -> None:
    hidden = original.config.get("mm_hidden_size")
    if hidden is not None and hidden != vision_config.hidden_size:
        raise ValueError(f"{original.folder}: mm_hidden_size {hidden} but the vision tower has "
                         f"hidden size {vision_config.hidden_size}; pass the tower it was "
                         "trained with (--vision-tower)")


def _parts(original: OriginalCheckpoint, tower: str, llm_folder: str | None,
           vision_config: Any) -> Parts:
    """The LLM, projector and tower tensors: the checkpoint's where it has them (a full
    checkpoint's frozen tower included), else the base LLM's and the tower folder's."""
    if original.kind == "full":
        parts = split_original(read_state(original.folder), original.folder)
    else:
        from transformers import AutoModelForCausalLM

        llm = load_pretrained(AutoModelForCausalLM, llm_folder, "base LLM")
        parts = Parts(dict(llm.state_dict()), _projector(original), {})
        if original.kind == "lora":
            _merge_adapter(parts.llm, original.folder)
    if not parts.tower:
        vision = load_pretrained(vision_model_class(vision_config), tower, "vision tower",
                                 allowed_unexpected=TWO_TOWER_EXTRAS)
        parts.tower = dict(vision.state_dict())
    if not parts.projector:
        raise ValueError(f"{original.folder}: no model.mm_projector.* tensors; not a LLaVA")
    return parts


def _projector(original: OriginalCheckpoint) -> dict[str, Any]:
    if original.kind == "lora":
        return projector_of_non_lora(read_state(original.folder, NON_LORA_FILE),
                                     original.folder / NON_LORA_FILE)
    return read_projector_file(original.folder / MM_PROJECTOR_FILE)


def _merge_adapter(llm: dict[str, Any], folder: Path) -> None:
    """Merge the run's LoRA into the LLM tensors: `W += alpha/r · B @ A` (PEFT's
    merge_and_unload for plain LoRA; rsLoRA, DoRA and per-module ranks are refused)."""
    from safetensors.torch import load_file

    from llava_cli.artifacts.files import weight_file_named

    settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    unsupported = [k for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
                   if settings.get(k)]
    if unsupported or settings.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: {unsupported or settings['peft_type']} "
                         "is not plain LoRA; only plain LoRA runs convert")
    scale = settings["lora_alpha"] / settings["r"]
    with weight_file_named(folder / ADAPTER_FILE):
        adapter = load_file(str(folder / ADAPTER_FILE))
    for key in sorted(k for k in adapter if ".lora_A." in k):
        ours = adapter_key_to_ours(key)  # refuses LoRA outside the LLM's layers
        target = "model." + ours.split("language_model.", 1)[1].replace(".lora_A.weight",
                                                                        ".weight")
        pair = key.replace(".lora_A.", ".lora_B.")
        if target not in llm or pair not in adapter:
            raise ValueError(f"{folder / ADAPTER_FILE}: {key} has no "
                             f"{'weight' if target not in llm else 'lora_B'} to merge into")
        delta = adapter[pair].float() @ adapter[key].float()
        llm[target] = (llm[target].float() + scale * delta).to(llm[target].dtype)
    leftover = [k for k in adapter if ".lora_A." not in k and ".lora_B." not in k]
    if leftover:
        raise ValueError(f"{folder / ADAPTER_FILE}: keys that are not LoRA pairs "
                         f"({leftover[:3]}); they would be lost")


def _add_rows(parts: Parts, vocab: int) -> None:
    """Embedding and lm_head rows for the tokens we add (`<image>`): the mean of the existing
    rows (deterministic; the image row's input is replaced by image features anyway)."""
    import torch

    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = parts.llm.get(key)
        if weight is None or weight.shape[0] >= vocab:
            continue
        extra = weight.float().mean(0, keepdim=True).expand(vocab - weight.shape[0], -1)
        parts.llm[key] = torch.cat([weight, extra.to(weight.dtype)])


def _place(model: Any, state: dict[str, Any], where: Path) -> None:
    """Load `state` into `model` strictly, in the model's dtype."""
    import torch

    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [k for k in set(state) & set(target) if state[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: its tensors do not fit the converted model (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes "
                         f"{sorted(shapes)[:3]}); nothing was written")
    with torch.no_grad():
        model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()},
                              strict=True)

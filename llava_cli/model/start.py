"""The model a training run starts from, and what its manifest must record about that base.

Starting points (`model_name_or_path`) are told apart by their contents, never by their names:
a `pretrain` output (manifest kind `projector`), any HF-layout LLaVA checkpoint (ours or
llava-hf), or a plain causal LM (a new model, with `vision_tower`). Whichever it is, the base
recorded for the manifest carries a fingerprint of the weight files it was loaded from.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import (
    Base,
    CheckpointBase,
    OutputKind,
    PartsBase,
    base_fingerprint,
    read_manifest,
)
from llava_cli.artifacts.original_layout import OriginalCheckpoint, find_original
from llava_cli.artifacts.projector_file import PROJECTOR_FILE
from llava_cli.artifacts.ranks import is_main_process
from llava_cli.config.run_config import RunConfig
from llava_cli.data.text.tokenizer import check_image_markers, marker_ids
from llava_cli.model.inputs import image_tokens_per_image
from llava_cli.model.load import load_llava
from llava_cli.model.projector import load_projector_weights

LLAVA_MODEL_TYPES = ("llava", "llava_next")


@dataclass
class Loaded:
    """A model ready for training plus what the run manifest must record about its base."""

    model: Any
    processor: Any
    base: Base


def load_starting_model(config: RunConfig) -> Loaded:
    """Build or load the model a training run starts from (see the module docstring)."""
    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required (an LLM, a LLaVA checkpoint or a "
                         "pretrain output directory)")
    path = Path(config.model_name_or_path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None and manifest.kind == OutputKind.LORA:
        raise ValueError(f"{path} is a LoRA run (manifest kind 'lora'); merge it first with "
                         "`llava merge-lora`, or start from its base")
    original = find_original(path) if manifest is None else None
    if manifest is not None and manifest.kind == OutputKind.PROJECTOR:
        _refuse_new_model_settings(config, f"{path} (a pretrain output)")
        loaded = _from_pretrain_output(path, manifest.base, config)
    elif original is not None:  # the original LLaVA's layout: converted in memory
        loaded = _from_original(original, config)
    elif _is_llava_checkpoint(path, config):
        _refuse_new_model_settings(config, f"{path} (a LLaVA checkpoint)")
        loaded = Loaded(load_llava(str(path), config), _load_processor(path, config),
                        CheckpointBase(path=_resolved(str(path))))
    else:
        _refuse_plain_folder(path)
        loaded = _new_model(config)
    check_image_markers(loaded.processor.tokenizer, config.mm_use_im_start_end,
                        f"the starting model {str(path)!r}")
    _refuse_other_image_policy(config, loaded.model.config)
    _refuse_other_features(config, loaded.model.config)
    if not getattr(loaded.model.config, "image_grid_pinpoints", None):
        # A checkpoint may say 576 for a tower that yields 49: what we save must be true.
        loaded.model.config.image_seq_length = image_tokens_per_image(loaded.model.config)
    if config.pretrained_projector:
        load_projector_weights(loaded.model, config.pretrained_projector,
                               _embedding_rows(loaded, config))
        loaded.base = loaded.base.model_copy(update={
            "pretrained_projector": str(Path(config.pretrained_projector).resolve())})
    if is_main_process():  # it writes the manifest; a merge refuses a changed base
        loaded.base = loaded.base.model_copy(update={"fingerprint": base_fingerprint(
            loaded.base)})
    return loaded


def _embedding_rows(loaded: Loaded, config: RunConfig) -> list[int] | None:
    """The input-embedding rows a stage-1 projector file gives stage 2: `<im_start>`/`<im_end>`
    (the original loads just these), when the run writes them."""
    return marker_ids(loaded.processor.tokenizer) if config.mm_use_im_start_end else None


def _from_original(original: OriginalCheckpoint, config: RunConfig) -> Loaded:
    """An original-layout full checkpoint, converted on the fly (`model.original`); its
    tower is `--vision-tower` when given, else the one `mm_vision_tower` names."""
    from llava_cli.model.original import build_from_original

    where = original.folder
    if original.kind != "full":
        how = ("merge it with `llava merge-lora RUN --base LLM -o OUT`" if original.kind ==
               "lora" else f"pass --model-name-or-path LLM --vision-tower TOWER "
               f"--pretrained-projector {where}/mm_projector.bin")
        raise ValueError(f"{where} is an original LLaVA {original.kind} run, not a model to "
                         f"train on; {how}, or convert it with `llava convert {where} --base "
                         "LLM -o OUT`")
    _refuse_new_model_settings(config.model_copy(update={"vision_tower": None}),
                               f"{where} (an original LLaVA checkpoint)")
    converted = build_from_original(original, config.vision_tower, None, config.template,
                                    config.load_dtype)
    loaded = Loaded(converted.model, converted.processor, converted.base)
    if config.bits != 16:  # bitsandbytes quantizes at load time: go through a saved copy
        loaded.model = _requantize(loaded.model, loaded.processor, config)
    return loaded


def _refuse_plain_folder(path: Path) -> None:
    """A local folder that is no model at all (no config.json, no run manifest)."""
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model {str(path)!r} is a folder without config.json: neither an "
                         "LLM, a LLaVA checkpoint nor a pretrain output; point "
                         "--model-name-or-path at one")


def _refuse_new_model_settings(config: RunConfig, source: str) -> None:
    """A setting that cannot apply is an error, never silently ignored (and then recorded in
    the manifest as if it had been applied)."""
    given = [key for key, value in (("vision_tower", config.vision_tower),
                                    ("random_init", config.random_init),
                                    ("image_grid_pinpoints", config.image_grid_pinpoints))
             if value]
    if config.projector_type != "mlp2x_gelu":  # what every LLaVA checkpoint here has
        given.append(f"projector_type {config.projector_type}")
    if given:
        raise ValueError(f"{', '.join(given)}: {source} already has its vision tower and "
                         "projector, so these settings (which build a new model) cannot apply; "
                         "drop them, or start from an LLM to build a new model")


def _refuse_other_features(config: RunConfig, model_config: Any) -> None:
    """An explicitly given feature selection the starting model does not have."""
    given = config.model_fields_set
    layer = model_config.vision_feature_layer
    if "vision_select_layer" in given and config.vision_select_layer != layer:
        raise ValueError(f"vision_select_layer {config.vision_select_layer}: the starting model "
                         f"uses layer {layer} of its vision tower; drop the setting")
    full = model_config.vision_feature_select_strategy == "full"
    wanted = config.vision_select_feature == "cls_patch"
    if "vision_select_feature" in given and wanted != full and _has_cls_position(model_config):
        raise ValueError(f"vision_select_feature {config.vision_select_feature}: the starting "
                         f"model uses strategy {model_config.vision_feature_select_strategy!r};"
                         " drop the setting")


def _has_cls_position(model_config: Any) -> bool:
    from llava_cli.model.vision import has_cls_token

    return has_cls_token(model_config.vision_config)


def _refuse_other_image_policy(config: RunConfig, model_config: Any) -> None:
    """LLaVA-NeXT models tile images (anyres); LLaVA models take one (square or pad)."""
    tiles = bool(getattr(model_config, "image_grid_pinpoints", None))
    if tiles and config.image_aspect_ratio != "anyres":
        raise ValueError(f"image_aspect_ratio {config.image_aspect_ratio!r}: this is a "
                         "LLaVA-NeXT model, which tiles every image; pass "
                         "--image-aspect-ratio anyres")
    if not tiles and config.image_aspect_ratio == "anyres":
        raise ValueError("image_aspect_ratio 'anyres' needs a LLaVA-NeXT model; this LLaVA "
                         "model takes one image per placeholder: use pad (LLaVA-1.5) or square")


def _is_llava_checkpoint(path: Path, config: RunConfig) -> bool:
    """A LLaVA checkpoint: a local folder's config.json, or a hub id's config, says so."""
    if path.is_dir():
        file = path / "config.json"
        return file.is_file() and json.loads(file.read_text()).get("model_type") in (
            LLAVA_MODEL_TYPES)
    from transformers import AutoConfig

    try:
        found = AutoConfig.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"model {str(path)!r} is neither a local folder nor a loadable hub "
                         f"model: {err}") from err
    return getattr(found, "model_type", None) in LLAVA_MODEL_TYPES


def _load_processor(path: Path, config: RunConfig) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)


def _new_model(config: RunConfig, add_markers: bool = True) -> Loaded:
    """A new model from an LLM and a vision tower; it gets `<im_start>`/`<im_end>` when the
    run asks for them, unless `add_markers` is off (a pretrain output's tokenizer has them
    or not: `check_image_markers` judges)."""
    from llava_cli.data.text.tokenizer import add_llava_tokens, load_tokenizer
    from llava_cli.model.build import build_new_model

    source = config.tokenizer or str(config.model_name_or_path)
    tokenizer = load_tokenizer(source, config.trust_remote_code)
    add_llava_tokens(tokenizer, config.mm_use_im_start_end and add_markers)
    check_image_markers(tokenizer, config.mm_use_im_start_end, f"the tokenizer {source!r}")
    model, processor = build_new_model(config, tokenizer)
    base = PartsBase(llm=_resolved(config.model_name_or_path),
                     vision_tower=_resolved(config.vision_tower),
                     vision_select_layer=config.vision_select_layer,
                     vision_select_feature=config.vision_select_feature,
                     projector_type=config.projector_type, random_init=config.random_init)
    if config.bits != 16:  # bitsandbytes quantizes at load time: go through a saved copy
        model = _requantize(model, processor, config)
    return Loaded(model, processor, base)


def _resolved(name: str | None) -> str | None:
    """Local paths become absolute (so a manifest works from anywhere); hub ids stay."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def _requantize(model: Any, processor: Any, config: RunConfig) -> Any:
    with tempfile.TemporaryDirectory(prefix="llava-compose-") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return load_llava(folder, config)


def _from_pretrain_output(path: Path, base: Base, config: RunConfig) -> Loaded:
    """LLM + vision tower (+ the trained projector) as recorded by a `pretrain` run."""
    if isinstance(base, CheckpointBase):
        # A pretrain from a LLaVA checkpoint names it; a random-init pretrain keeps its base
        # weights in the run (`base/`, relative). Absolute either way: later manifests too.
        inside = path / base.path
        where = str(inside.resolve()) if not Path(base.path).is_absolute() and inside.is_dir() \
            else base.path  # an absolute folder, or a hub id
        loaded = Loaded(load_llava(where, config), _load_processor(path, config),
                        base.model_copy(update={"path": where}))
    elif isinstance(base, PartsBase):
        parts = config.model_copy(update={
            "model_name_or_path": base.llm, "vision_tower": base.vision_tower,
            "tokenizer": str(path), "vision_select_layer": base.vision_select_layer,
            "vision_select_feature": base.vision_select_feature,
            "projector_type": base.projector_type})
        loaded = _new_model(parts, add_markers=False)
    else:
        raise ValueError(f"{path}: a pretrain output cannot have a merged base ({base})")
    check_image_markers(loaded.processor.tokenizer, config.mm_use_im_start_end,
                        f"the pretrain output {str(path)!r}")  # before its file is read
    if not config.pretrained_projector:  # an explicit projector file wins over the run's own
        load_projector_weights(loaded.model, str(path / PROJECTOR_FILE),
                               _embedding_rows(loaded, config))
        loaded.base = loaded.base.model_copy(update={
            "pretrained_projector": str((path / PROJECTOR_FILE).resolve())})
    return loaded

"""The model a training run starts from, and what its manifest must record about that base.

Starting points (`model_name_or_path`) are told apart by their contents, never by their names:
a `pretrain` output (manifest kind `projector`), any HF-layout LLaVA checkpoint (ours or
llava-hf), or a plain causal LM (a new model, with `vision_tower`).
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
    read_manifest,
)
from llava_cli.artifacts.output_dir import BASE_DIR
from llava_cli.artifacts.projector_file import PROJECTOR_FILE
from llava_cli.config.run_config import RunConfig
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
    if manifest is not None and manifest.kind == OutputKind.PROJECTOR:
        loaded = _from_pretrain_output(path, manifest.base, config)
    elif _is_llava_checkpoint(path, config):
        loaded = Loaded(load_llava(str(path), config), _load_processor(path, config),
                        CheckpointBase(path=_resolved(str(path))))
    else:
        loaded = _new_model(config)
    if config.pretrained_projector:
        load_projector_weights(loaded.model, config.pretrained_projector)
        loaded.base = loaded.base.model_copy(update={
            "pretrained_projector": str(Path(config.pretrained_projector).resolve())})
    return loaded


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


def _new_model(config: RunConfig) -> Loaded:
    from llava_cli.data.text.tokenizer import add_llava_tokens, load_tokenizer
    from llava_cli.model.build import build_new_model

    tokenizer = load_tokenizer(config.tokenizer or str(config.model_name_or_path),
                               config.trust_remote_code)
    add_llava_tokens(tokenizer)
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
    if isinstance(base, CheckpointBase):  # random-init pretrain: its base weights live in the run
        base_dir = (path / BASE_DIR).resolve()  # absolute: later manifests must find it
        loaded = Loaded(load_llava(str(base_dir), config), _load_processor(path, config),
                        base.model_copy(update={"path": str(base_dir)}))
    elif isinstance(base, PartsBase):
        parts = config.model_copy(update={
            "model_name_or_path": base.llm, "vision_tower": base.vision_tower,
            "tokenizer": str(path), "vision_select_layer": base.vision_select_layer,
            "vision_select_feature": base.vision_select_feature,
            "projector_type": base.projector_type})
        loaded = _new_model(parts)
    else:
        raise ValueError(f"{path}: a pretrain output cannot have a merged base ({base})")
    if not config.pretrained_projector:  # an explicit projector file wins over the run's own
        load_projector_weights(loaded.model, str(path / PROJECTOR_FILE))
        loaded.base = loaded.base.model_copy(update={
            "pretrained_projector": str((path / PROJECTOR_FILE).resolve())})
    return loaded

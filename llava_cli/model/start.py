"""Where a run's model comes from, projector files in and out, and writing a run's output.

Starting points for training (`model_name_or_path`), told apart by their contents, never by
their names: a `pretrain` output (manifest kind `projector`), any HF-layout LLaVA checkpoint
(ours or llava-hf), or a plain causal LM (a new model, with `vision_tower`).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.config import RunConfig
from llava_cli.manifest import read_manifest

PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PREFIX = "multi_modal_projector."  # the stock llava-hf key prefix on disk
BASE_DIR = "base"  # random-init pretrain runs keep their (unrecoverable) initial weights here
# The original LLaVA's mm_projector keys → ours (mlp2x_gelu: Linear, GELU, Linear).
_LLAVA_KEYS = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
               "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}


@dataclass
class Loaded:
    """A model ready for training plus what the run manifest must record about its base."""

    model: Any
    processor: Any
    base: dict[str, Any]


LLAVA_MODEL_TYPES = ("llava", "llava_next")


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


def load_starting_model(config: RunConfig) -> Loaded:
    """Build or load the model a training run starts from (see the module docstring)."""
    from llava_cli.model_factory import load_llava

    if not config.model_name_or_path:
        raise ValueError("model_name_or_path is required (an LLM, a LLaVA checkpoint or a "
                         "pretrain output directory)")
    path = Path(config.model_name_or_path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None and manifest.kind == "lora":
        raise ValueError(f"{path} is a LoRA run (manifest kind 'lora'); merge it first with "
                         "`llava merge-lora`, or start from its base")
    if manifest is not None and manifest.kind == "projector":
        loaded = _from_pretrain_output(path, manifest.base, config)
    elif _is_llava_checkpoint(path, config):
        loaded = Loaded(load_llava(str(path), config), _load_processor(path, config),
                        {"type": "llava", "path": _resolved(str(path))})
    else:
        loaded = _new_model(config)
    if config.pretrained_projector:
        load_projector_weights(loaded.model, config.pretrained_projector)
        loaded.base["pretrained_projector"] = str(Path(config.pretrained_projector).resolve())
    return loaded


def _load_processor(path: Path, config: RunConfig) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)


def _new_model(config: RunConfig) -> Loaded:
    from llava_cli.model_factory import build_new_model
    from llava_cli.text_side import add_llava_tokens, load_tokenizer

    tokenizer = load_tokenizer(config.tokenizer or str(config.model_name_or_path),
                               config.trust_remote_code)
    add_llava_tokens(tokenizer)
    model, processor = build_new_model(config, tokenizer)
    base = {"type": "parts", "llm": _resolved(config.model_name_or_path),
            "vision_tower": _resolved(config.vision_tower),
            "vision_select_layer": config.vision_select_layer,
            "vision_select_feature": config.vision_select_feature,
            "projector_type": config.projector_type, "random_init": config.random_init}
    if config.bits != 16:  # bitsandbytes quantizes at load time: go through a saved copy
        model = _requantize(model, processor, config)
    return Loaded(model, processor, base)


def _resolved(name: str | None) -> str | None:
    """Local paths become absolute (so a manifest works from anywhere); hub ids stay."""
    return str(Path(name).resolve()) if name and Path(name).exists() else name


def _requantize(model: Any, processor: Any, config: RunConfig) -> Any:
    from llava_cli.model_factory import load_llava

    with tempfile.TemporaryDirectory(prefix="llava-compose-") as folder:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return load_llava(folder, config)


def _from_pretrain_output(path: Path, base: dict[str, Any], config: RunConfig) -> Loaded:
    """LLM + vision tower (+ the trained projector) as recorded by a `pretrain` run."""
    if base.get("type") == "llava":  # random-init pretrain: its base weights live in the run
        from llava_cli.model_factory import load_llava

        base_dir = (path / BASE_DIR).resolve()  # absolute: later manifests must find it
        loaded = Loaded(load_llava(str(base_dir), config), _load_processor(path, config),
                        {**base, "path": str(base_dir)})
    else:
        parts = config.model_copy(update={
            "model_name_or_path": base["llm"], "vision_tower": base["vision_tower"],
            "tokenizer": str(path), "vision_select_layer": base["vision_select_layer"],
            "vision_select_feature": base["vision_select_feature"],
            "projector_type": base["projector_type"]})
        loaded = _new_model(parts)
    if not config.pretrained_projector:  # an explicit projector file wins over the run's own
        load_projector_weights(loaded.model, str(path / PROJECTOR_FILE))
        loaded.base["pretrained_projector"] = str((path / PROJECTOR_FILE).resolve())
    return loaded


def read_projector_file(file: str | Path) -> dict[str, Any]:
    """Projector tensors from our safetensors or LLaVA's `mm_projector.bin`, keyed
    `linear_1.weight`, … . Pickles load with `weights_only=True`: no code ever runs."""
    import torch
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise ValueError(f"projector file {str(file)!r} not found")
    if file.suffix == ".safetensors":
        state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle errors have many types
            raise ValueError(f"{file}: not a plain tensor file; refusing to unpickle arbitrary "
                             f"objects ({err})") from err
    return _normalise_projector_keys(state, file)


def _normalise_projector_keys(state: dict[str, Any], file: Path) -> dict[str, Any]:
    out = {}
    for key, tensor in state.items():
        short = key
        for prefix in ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.",
                       PROJECTOR_PREFIX):
            if key.startswith(prefix):
                short = key[len(prefix):]
                break
        out[_LLAVA_KEYS.get(short, short)] = tensor
    if not out:
        raise ValueError(f"{file}: no projector tensors found")
    return out


def gathered(module: Any, modify: bool = False) -> Any:
    """Context in which a module's ZeRO-3-partitioned parameters are whole (a no-op otherwise).

    Without it, a ZeRO-3 model's parameters have placeholder shapes ((0,) or flattened), and
    writing or saving them is LLaVA's classic "projector lost under ZeRO-3" bug.
    """
    from contextlib import nullcontext

    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def load_projector_weights(model: Any, file: str | Path) -> None:
    """Load a projector file into `model`, with a clear error when shapes differ."""
    from llava_cli.model_factory import components

    projector = components(model).projector
    state = read_projector_file(file)
    with gathered(projector, modify=True):
        _copy_into(projector, state, file)


def _copy_into(projector: Any, state: dict[str, Any], file: str | Path) -> None:
    import torch

    target = projector.state_dict()
    if set(state) != set(target):
        raise ValueError(f"{file}: projector keys {sorted(state)} do not match this model's "
                         f"{sorted(target)} (projector type differs?)")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(
                f"{file}: projector {key} has shape {tuple(tensor.shape)} but this model needs "
                f"{tuple(target[key].shape)} (vision hidden size × LLM hidden size); the file "
                "was trained for another LLM or vision tower")
    with torch.no_grad():
        projector.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()})


def projector_state(model: Any, full_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The projector's tensors under their stock on-disk names (`multi_modal_projector.…`).

    `full_state`: a whole-model state dict already gathered (DeepSpeed's save path); without
    it the projector is gathered here — collectively, so call this on every rank.
    """
    from llava_cli.model_factory import components

    if full_state is not None:
        state = {PROJECTOR_PREFIX + k.split(PROJECTOR_PREFIX, 1)[1]: v.detach().cpu().contiguous()
                 for k, v in full_state.items() if PROJECTOR_PREFIX in k}
        if not state:  # DeepSpeed hands an empty dict when ZeRO-3 does not gather on save
            raise ValueError("no projector weights to save: with ZeRO-3 set "
                             "stage3_gather_16bit_weights_on_model_save: true (as "
                             "recipes/deepspeed/zero3.json does)")
        return state
    projector = components(model).projector
    with gathered(projector):
        return {PROJECTOR_PREFIX + k: v.detach().cpu().clone().contiguous()
                for k, v in projector.state_dict().items()}


def save_projector(model: Any, file: str | Path,
                   full_state: dict[str, Any] | None = None) -> Path:
    """Write the projector as safetensors with the stock on-disk key names."""
    return write_projector_file(projector_state(model, full_state), file)


def write_projector_file(state: dict[str, Any], file: str | Path) -> Path:
    """Write projector tensors to safetensors atomically."""
    from safetensors.torch import save_file

    file = Path(file)
    temporary = file.with_suffix(".tmp")
    save_file(state, str(temporary), metadata={"format": "pt"})
    temporary.replace(file)
    return file

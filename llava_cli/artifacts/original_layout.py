"""The original LLaVA's layout (haotian-liu/LLaVA `LlavaLlamaForCausalLM`), read and written:
what kind of folder it is, its `mm_*` config keys, and the key maps between its tensors and
ours, both ways. Tensors and dicts in, tensors and dicts out: building a live model from them
is `model.original`.

The original keeps the projector inside the LLM's state dict (`model.mm_projector.{0,2}.*`,
an `nn.Sequential(Linear, GELU, Linear)`), the frozen tower (when saved at all) under
`model.vision_tower.vision_tower.vision_model.*`, and a LoRA run as a PEFT adapter on the
plain LLM (`base_model.model.model.layers.*`) plus `non_lora_trainables.bin`
(`base_model.model.model.mm_projector.*`). It uses no vocabulary token for images (id -200
stands in the ids); ours does, so an `<image>` row is added on the way in and dropped on
the way out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.artifacts.files import weight_file_named
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG, ADAPTER_FILE, FROM_LLAVA, TO_LLAVA

ORIGINAL_MODEL_TYPE = "llava_llama"
ORIGINAL_ARCHITECTURE = "LlavaLlamaForCausalLM"
NON_LORA_FILE = "non_lora_trainables.bin"
MM_PROJECTOR_FILE = "mm_projector.bin"
IMAGE_TOKEN_INDEX = -200  # the original's stand-in id for an image's features
PROJECTOR_KEY = "model.mm_projector."
TOWER_KEY = "model.vision_tower.vision_tower."  # then the CLIPVisionModel's own keys
LORA_LLM_KEY = "base_model.model.model."  # the original adapter's LLM prefix
NON_LORA_PROJECTOR_KEY = "base_model.model.model.mm_projector."
# Our in-memory names (LlavaForConditionalGeneration in transformers 5).
OUR_LLM, OUR_TOWER, OUR_PROJECTOR = ("model.language_model.", "model.vision_tower.",
                                     "model.multi_modal_projector.")
OUR_LORA_LLM = "base_model.model.model.language_model."
# Config keys that describe the multimodal part, not the LLM (dropped from the text config).
MM_KEYS = ("mm_hidden_size", "mm_patch_merge_type", "mm_projector_lr", "mm_projector_type",
           "mm_use_im_patch_token", "mm_use_im_start_end", "mm_vision_select_feature",
           "mm_vision_select_layer", "mm_vision_tower", "image_aspect_ratio", "use_mm_proj",
           "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tokenizer_model_max_length",
           "tokenizer_padding_side", "unfreeze_mm_vision_tower", "mm_vision_tower_lr",
           "image_grid_pinpoints", "_name_or_path", "architectures", "model_type",
           "transformers_version", "torch_dtype")
ORIGINAL_FEATURES = {"patch": "default", "cls_patch": "full"}  # → vision_feature_select_strategy
KINDS = ("full", "projector", "lora")


@dataclass
class OriginalCheckpoint:
    """An original-layout folder: `full` (a whole model), `projector` (stage 1:
    mm_projector.bin) or `lora` (adapter + non_lora_trainables.bin on a base LLM)."""

    folder: Path
    kind: str
    config: dict[str, Any]

    @property
    def vision_tower_name(self) -> str:
        """What `mm_vision_tower` names (a hub id or a path, as the original wrote it)."""
        return str(self.config.get("mm_vision_tower") or "")

    @property
    def base_name(self) -> str | None:
        """The LLM a projector or LoRA run was trained on, as its files name it."""
        if self.kind == "lora" and (self.folder / ADAPTER_CONFIG).is_file():
            found = json.loads((self.folder / ADAPTER_CONFIG).read_text())
            return found.get("base_model_name_or_path")
        return self.config.get("_name_or_path")


def find_original(folder: str | Path) -> OriginalCheckpoint | None:
    """The original-layout checkpoint in `folder`, told by its contents (a `llava_llama`
    config, an `mm_projector.bin`, or an adapter with `non_lora_trainables.bin`), or None."""
    path = Path(folder)
    file = path / "config.json"
    if not path.is_dir() or not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(config, dict):
        return None
    if (path / NON_LORA_FILE).is_file() and (path / ADAPTER_FILE).is_file():
        return OriginalCheckpoint(path, "lora", config)
    if (path / MM_PROJECTOR_FILE).is_file() and not _has_weights(path):
        return OriginalCheckpoint(path, "projector", config)
    if config.get("model_type") == ORIGINAL_MODEL_TYPE and _has_weights(path):
        return OriginalCheckpoint(path, "full", config)
    return None


def require_original(folder: str | Path) -> OriginalCheckpoint:
    """`find_original`, or a one-line error saying what an original-layout folder holds."""
    found = find_original(folder)
    if found is None:
        raise ValueError(f"{str(folder)!r} is not an original LLaVA checkpoint (a config.json "
                         f"with model_type {ORIGINAL_MODEL_TYPE!r} and weights, a "
                         f"{MM_PROJECTOR_FILE}, or {ADAPTER_FILE} + {NON_LORA_FILE}); "
                         "point at a folder written by haotian-liu/LLaVA's train.py")
    check_representable(found.config, found.folder)
    return found


def _has_weights(path: Path) -> bool:
    return any(path.glob("model*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def check_representable(config: dict[str, Any], where: Path) -> None:
    """Refuse what stock transformers' LlavaForConditionalGeneration cannot hold, naming why."""
    problems = []
    projector = config.get("mm_projector_type", "linear")  # the original's default
    if projector != "mlp2x_gelu":
        problems.append(f"mm_projector_type {projector!r} (only mlp2x_gelu checkpoints convert "
                        "today; a linear one's mm_projector.bin still imports with "
                        "--projector-type linear --pretrained-projector)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {config['mm_patch_merge_type']!r} (LLaVA-NeXT's "
                        "anyres tiling; only flat LLaVA-1.5 checkpoints convert)")
    if config.get("image_aspect_ratio", "square") not in ("pad", "square"):
        problems.append(f"image_aspect_ratio {config['image_aspect_ratio']!r} (pad or square)")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(key):
            problems.append(f"{key}: true (extra image marker tokens stock LLaVA has not)")
    if config.get("mm_vision_select_feature", "patch") not in ORIGINAL_FEATURES:
        problems.append(f"mm_vision_select_feature {config['mm_vision_select_feature']!r}")
    if problems:
        raise ValueError(f"{where}: cannot convert {'; '.join(problems)}; nothing was written")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The LLM's own config (a Llama config dict) inside an original LLaVA config."""
    # rope_scaling: null is what 4.x wrote for "none"; transformers 5 warns on the old key.
    llm = {k: v for k, v in config.items() if k not in MM_KEYS
           and not (k == "rope_scaling" and v is None)}
    return {**llm, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def read_state(folder: Path, name: str | None = None) -> dict[str, Any]:
    """Every tensor of a checkpoint folder (safetensors, sharded or not; or `name`, a `.bin`
    read with `weights_only=True`: no pickled code ever runs)."""
    import torch
    from safetensors.torch import load_file

    if name is not None:
        files = [folder / name]
    else:
        files = sorted(folder.glob("model*.safetensors")) or sorted(
            folder.glob("pytorch_model*.bin"))
    state: dict[str, Any] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with weight_file_named(file):
                state.update(load_file(str(file)))
            continue
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle errors have many types
            raise ValueError(f"{file}: not a plain tensor file; refusing to unpickle arbitrary "
                             f"objects ({err})") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{file}: holds a {type(loaded).__name__}, not tensors by name")
        state.update(loaded)
    if not state:
        raise ValueError(f"{folder}: no weight files (model*.safetensors, pytorch_model*.bin)")
    return state


@dataclass
class Parts:
    """An original checkpoint's tensors by part, each under the part's own module names:
    `llm` as LlamaForCausalLM, `projector` as ours (linear_1/linear_2), `tower` as the
    CLIP/SigLIP vision model in memory (transformers 5: no `vision_model.` prefix)."""

    llm: dict[str, Any]
    projector: dict[str, Any]
    tower: dict[str, Any]


def split_original(state: dict[str, Any], where: Path) -> Parts:
    """An original full state dict split into its parts (unknown keys are an error)."""
    parts = Parts({}, {}, {})
    for key, tensor in state.items():
        if key.startswith(PROJECTOR_KEY):
            short = key[len(PROJECTOR_KEY):]
            if short not in FROM_LLAVA:
                raise ValueError(f"{where}: projector key {key!r} is not mlp2x_gelu's")
            parts.projector[FROM_LLAVA[short]] = tensor
        elif key.startswith(TOWER_KEY):
            parts.tower[key[len(TOWER_KEY):].removeprefix("vision_model.")] = tensor
        elif key.startswith(("model.", "lm_head.")):
            parts.llm[key] = tensor
        else:
            raise ValueError(f"{where}: key {key!r} belongs to no part of an original LLaVA")
    return parts


def to_ours(parts: Parts) -> dict[str, Any]:
    """Parts under our LlavaForConditionalGeneration's in-memory names."""
    out = {OUR_PROJECTOR + k: v for k, v in parts.projector.items()}
    out.update({OUR_TOWER + k: v for k, v in parts.tower.items()})
    for key, tensor in parts.llm.items():
        out[key if key.startswith("lm_head.") else OUR_LLM + key.removeprefix("model.")] = tensor
    return out


def from_ours(state: dict[str, Any]) -> Parts:
    """Our in-memory state dict split into parts (the inverse of `to_ours`)."""
    parts = Parts({}, {}, {})
    for key, tensor in state.items():
        if key.startswith(OUR_PROJECTOR):
            parts.projector[key[len(OUR_PROJECTOR):]] = tensor
        elif key.startswith(OUR_TOWER):
            parts.tower[key[len(OUR_TOWER):]] = tensor
        elif key.startswith(OUR_LLM):
            parts.llm["model." + key[len(OUR_LLM):]] = tensor
        elif key.startswith("lm_head."):
            parts.llm[key] = tensor
        else:
            raise ValueError(f"key {key!r} belongs to no part of a LLaVA model")
    return parts


def to_original(parts: Parts, with_tower: bool = True) -> dict[str, Any]:
    """Parts under the original's names (what its `save_pretrained` wrote)."""
    out = dict(parts.llm)
    out.update({PROJECTOR_KEY + TO_LLAVA[k]: v for k, v in parts.projector.items()})
    if with_tower:
        out.update({TOWER_KEY + "vision_model." + k: v for k, v in parts.tower.items()})
    return out


def projector_of_non_lora(state: dict[str, Any], where: Path) -> dict[str, Any]:
    """The projector in a `non_lora_trainables.bin`, keyed linear_1/linear_2 (it may hold
    nothing else: other trained parts would be lost by a silent conversion)."""
    projector, other = {}, []
    for key, tensor in state.items():
        # As the original's loader reads it: whatever prefix, then mm_projector.{0,2}.*
        short = key.split("mm_projector.", 1)[1] if "mm_projector." in key else None
        if short in FROM_LLAVA:
            projector[FROM_LLAVA[short]] = tensor
        else:
            other.append(key)
    if other or len(projector) != len(FROM_LLAVA):
        raise ValueError(f"{where}: expected exactly the mlp2x_gelu projector "
                         f"({NON_LORA_PROJECTOR_KEY}{{0,2}}.*), found {sorted(state)[:4]}; "
                         "other trained parts cannot be converted")
    return projector


def non_lora_of(projector: dict[str, Any]) -> dict[str, Any]:
    """Our projector tensors (linear_1/linear_2) as the original's non_lora_trainables."""
    return {NON_LORA_PROJECTOR_KEY + TO_LLAVA[k]: v for k, v in projector.items()}


def adapter_key_to_ours(key: str) -> str:
    """An original adapter key (on the plain LLM) as ours (inside LlavaForConditionalGeneration)."""
    if not key.startswith(LORA_LLM_KEY + "layers."):
        raise ValueError(f"adapter key {key!r}: only LoRA on the LLM's layers converts")
    return OUR_LORA_LLM + key[len(LORA_LLM_KEY):]


def adapter_key_to_original(key: str) -> str:
    """Our adapter key as the original's (the LLM's layers only)."""
    if not key.startswith(OUR_LORA_LLM + "layers."):
        raise ValueError(f"adapter key {key!r}: the original layout holds LoRA on the LLM's "
                         "layers only (retrain without LoRA elsewhere)")
    return LORA_LLM_KEY + key[len(OUR_LORA_LLM):]


def original_config(text: dict[str, Any], vision_tower: str, hidden: int, layer: int,
                    feature: str, aspect_ratio: str, architecture: str) -> dict[str, Any]:
    """An original LLaVA config.json: the LLM's config plus the `mm_*` keys."""
    return {**{k: v for k, v in text.items() if k not in MM_KEYS},
            "architectures": [architecture], "model_type": ORIGINAL_MODEL_TYPE,
            "mm_vision_tower": vision_tower, "mm_hidden_size": hidden,
            "mm_projector_type": "mlp2x_gelu", "mm_projector_lr": None,
            "mm_vision_select_layer": layer,
            "mm_vision_select_feature": feature, "mm_patch_merge_type": "flat",
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
            "image_aspect_ratio": aspect_ratio, "use_mm_proj": True,
            "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False}

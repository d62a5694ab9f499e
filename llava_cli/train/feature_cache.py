"""The frozen-tower feature cache: a frozen vision tower's selected-layer features on disk,
keyed by image content and tower fingerprint, reused across epochs and runs.

The seam is transformers' own: `LlavaModel.forward` takes `mm_encoder_outputs` in place of
`pixel_values` and scatters their `pooler_output` (the projector's output, one tensor per
image) into the input embeddings itself, with its own placeholder check. So the trainer only
swaps the inputs (`FeatureCache.model_inputs`): features from disk (misses computed under
no_grad, as transformers selects them, and stored), the projector run here (it trains), and
the model called without pixels. Nothing in transformers is patched.

Layout: `DIR/<tower fingerprint>/<ab>/<image key>.safetensors`, each written atomically
(`artifacts.files`), so concurrent ranks and a kill never leave half an entry; an entry that
does not read back whole, or holds features of another shape or dtype than the tower makes
(measured once on one image, recorded in the folder's `features.json`), is computed again and
overwritten, with one warning. The image key hashes the processed pixel tensor (a different
processor setting gives other pixels, so other keys); the tower fingerprint hashes the
tower's weights, config, feature layer, select strategy, dtype, attention, device and
autocast (`tower_description`). Deleting the directory is always safe.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from llava_cli.artifacts.files import write_atomically, write_text_atomically
from llava_cli.model.parts import base_model, components

FORMAT = 1  # bump when what an entry holds changes: old entries then live in other folders
TENSOR = "features"
SHAPE_FILE = "features.json"  # the shape and dtype of one image's features, beside the entries
# Tower config entries that name, not define, the tower: they must not change its fingerprint.
NAMING_KEYS = ("_name_or_path", "transformers_version", "architectures", "torch_dtype", "dtype")


def feature_cache_for(model: Any, args: Any) -> FeatureCache | None:
    """The cache in `args.vision_feature_cache` for `model` (None without one), after checking
    that the model's tower can be cached exactly: ValueError (one line) otherwise."""
    directory = getattr(args, "vision_feature_cache", None)
    if not directory:
        return None
    from transformers import LlavaForConditionalGeneration

    base = base_model(model)
    if type(base) is not LlavaForConditionalGeneration:  # LLaVA-NeXT selects per tile
        raise ValueError(f"vision_feature_cache supports LLaVA models, not "
                         f"{type(base).__name__} (anyres is not supported yet)")
    tower = components(base).vision_tower
    if any(param.requires_grad for param in tower.parameters()):
        raise ValueError("vision_feature_cache: the vision tower trains, so its outputs change "
                         "every step; freeze it or drop the cache")
    if any(hasattr(param, "ds_id") for param in tower.parameters()):
        raise ValueError("vision_feature_cache is not supported under DeepSpeed ZeRO-3 (the "
                         "tower's weights are partitioned); use ZeRO-2, DDP or one device")
    dropout = {key: value for key, value in tower.config.to_dict().items()
               if "dropout" in key and isinstance(value, (int, float)) and value > 0}
    if dropout:
        raise ValueError(f"vision_feature_cache: the vision tower has dropout ({dropout}), so "
                         "its training outputs are random and a cache cannot reproduce them")
    return FeatureCache(directory)


def cache_metrics(cache: FeatureCache | None) -> dict[str, int]:
    """This process's cache hits and misses (images), for the run's metrics (none without)."""
    if cache is None:
        return {}
    return {"vision_feature_cache_hits": cache.hits, "vision_feature_cache_misses": cache.misses}


def image_key(pixels: torch.Tensor) -> str:
    """The content key of one processed image: blake2b of its float32 pixels and shape."""
    digest = hashlib.blake2b(digest_size=20)
    data = pixels.detach().to("cpu", torch.float32).contiguous()
    digest.update(f"{tuple(data.shape)}".encode())
    digest.update(data.numpy())  # the buffer itself: no copy
    return digest.hexdigest()


def tower_description(tower: Any, config: Any, device: torch.device) -> dict[str, Any]:
    """Everything besides the weights that decides the cached features (under the autocast
    that is active now: the trainer's mixed precision)."""
    tower_config = {key: value for key, value in tower.config.to_dict().items()
                    if key not in NAMING_KEYS}
    autocast = (str(torch.get_autocast_dtype(device.type))
                if torch.is_autocast_enabled(device.type) else None)
    return {"format": FORMAT, "tower_class": type(tower).__name__, "tower_config": tower_config,
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "dtype": str(next(tower.parameters()).dtype),
            "attn_implementation": getattr(tower.config, "_attn_implementation", None),
            "device": device.type, "autocast": autocast}


def tower_fingerprint(tower: Any, description: dict[str, Any]) -> str:
    """blake2b of the description and of every tensor of the tower (name, dtype, shape,
    bytes): other weights, another layer or strategy, another dtype → another folder."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")
    return digest.hexdigest()


def select_features(tower: Any, config: Any, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's features as `LlavaModel.get_image_features` selects them before its
    projector: hidden state(s) of `vision_feature_layer` (a list concatenates), the CLS
    position dropped under the "default" strategy."""
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    # transformers asks for the selected hidden states only (`select_hidden_states`); so do we
    outputs = tower(pixels, output_hidden_states=layer, return_dict=True)
    layers = [layer] if isinstance(layer, int) else list(layer)
    chosen = [outputs.hidden_states[index] for index in layers]
    if strategy == "default":
        chosen = [hidden[:, 1:] for hidden in chosen]
    return chosen[0] if isinstance(layer, int) else torch.cat(chosen, dim=-1)


class FeatureCache:
    """Selected-layer features of a frozen tower in a directory; counts its hits and misses."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.hits = 0
        self.misses = 0
        self._folders: dict[tuple[str, str | None], Path] = {}  # per (device, autocast)
        self._shapes: dict[Path, tuple[tuple[int, ...], torch.dtype]] = {}  # per folder
        self._warned = False

    def model_inputs(self, model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
        """`inputs` with `pixel_values` replaced by `mm_encoder_outputs` (the projector's
        output on the cached features); unchanged for a batch without images."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return inputs
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        parts = components(model)  # through DDP, DeepSpeed and PEFT
        config = base_model(model).config
        features = self.features(parts.vision_tower, config, pixels)
        projected = parts.projector(features)
        rest = {key: value for key, value in inputs.items() if key != "pixel_values"}
        # as get_image_features hands them over: one tensor per image
        image = BaseModelOutputWithPooling(pooler_output=list(projected))
        return {**rest, "mm_encoder_outputs": {"image": image}}

    def features(self, tower: Any, config: Any, pixels: torch.Tensor) -> torch.Tensor:
        """The selected features of each image in `pixels` (N, C, H, W): read where cached,
        else computed under no_grad (all misses of the batch in one forward) and stored."""
        folder = self._folder(tower, config, pixels.device)
        shape, dtype = self._expected(folder, tower, config, pixels)
        keys = [image_key(image) for image in pixels]
        found: list[torch.Tensor | None] = [read_entry(entry_path(folder, key), key)
                                            for key in keys]
        for i, feature in enumerate(found):
            if feature is not None and (tuple(feature.shape) != shape or feature.dtype != dtype):
                found[i] = None  # not what this tower makes: damaged, computed again
                self._say_damaged(entry_path(folder, keys[i]), feature, shape, dtype)
        missing = [i for i, feature in enumerate(found) if feature is None]
        if missing:
            with torch.no_grad():
                computed = select_features(tower, config, pixels[missing])
            for i, feature in zip(missing, computed, strict=True):
                found[i] = feature
                write_entry(entry_path(folder, keys[i]), keys[i], feature)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([feature.to(pixels.device) for feature in found])  # type: ignore

    def _expected(self, folder: Path, tower: Any, config: Any, pixels: torch.Tensor
                  ) -> tuple[tuple[int, ...], torch.dtype]:
        """The (shape, dtype) of one image's features from this tower set-up (an entry of any
        other is damaged): from the folder's `features.json`, else measured on the batch's
        first image and written there, so a warm run never runs the tower."""
        if folder not in self._shapes:
            expected = read_feature_shape(folder / SHAPE_FILE)
            if expected is None:
                with torch.no_grad():
                    feature = select_features(tower, config, pixels[:1])[0]
                expected = (tuple(feature.shape), feature.dtype)
                write_text_atomically(folder / SHAPE_FILE, json.dumps(
                    {"shape": list(expected[0]), "dtype": str(expected[1])}) + "\n")
            self._shapes[folder] = expected
        return self._shapes[folder]

    def _say_damaged(self, path: Path, feature: torch.Tensor, shape: tuple[int, ...],
                     dtype: torch.dtype) -> None:
        """Warn once per run that mismatched entries are computed again."""
        if self._warned:
            return
        self._warned = True
        warnings.warn(f"vision_feature_cache: entry {path} holds {tuple(feature.shape)} "
                      f"{feature.dtype} features where this tower makes {shape} {dtype}; "
                      "such entries are treated as damaged and computed again",
                      UserWarning, stacklevel=2)

    def _folder(self, tower: Any, config: Any, device: torch.device) -> Path:
        """The fingerprint folder (hashing the weights once per run and autocast setting),
        with a description of the tower beside the entries."""
        description = tower_description(tower, config, device)
        setting = (description["device"], description["autocast"])
        if setting not in self._folders:
            folder = self.directory / tower_fingerprint(tower, description)
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "tower.json").is_file():
                write_text_atomically(folder / "tower.json",
                                      json.dumps(description, indent=1, default=str) + "\n")
            self._folders[setting] = folder
        return self._folders[setting]


def read_feature_shape(path: Path) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The (shape, dtype) a `features.json` records; None when missing or not readable."""
    try:
        recorded = json.loads(path.read_text())
        dtype = getattr(torch, str(recorded["dtype"]).removeprefix("torch."))
        shape = tuple(int(size) for size in recorded["shape"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (shape, dtype) if isinstance(dtype, torch.dtype) else None


def entry_path(folder: Path, key: str) -> Path:
    """Where one image's features live: sharded by the key's first two characters."""
    return folder / key[:2] / f"{key}.safetensors"


def read_entry(path: Path, key: str) -> torch.Tensor | None:
    """The features stored at `path`, or None when missing or not whole (then recomputed)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as entry:
            if (entry.metadata() or {}).get("key") != key:
                return None
            return entry.get_tensor(TENSOR)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - truncated or corrupt (safetensors' own error types)
        return None


def write_entry(path: Path, key: str, feature: torch.Tensor) -> None:
    """Store one image's features (atomically: a reader sees the whole entry or none)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensor = feature.detach().to("cpu").contiguous()
    write_atomically(path, lambda temporary: save_file({TENSOR: tensor}, str(temporary),
                                                       metadata={"key": key}))

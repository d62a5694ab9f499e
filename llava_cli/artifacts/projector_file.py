"""The projector's file formats: ours (safetensors, stock llava-hf key names) and the original
LLaVA's `mm_projector.bin`, with the key maps between them, and the places the projector sits
inside other files (HF checkpoints, PEFT adapters).

Tensors in, tensors out: nothing here touches a live model (`model.projector` does that).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from llava_cli.artifacts.files import weight_file_named, write_atomically

PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_PREFIX = "multi_modal_projector."  # the stock llava-hf key prefix on disk
LLAVA_PREFIX = "model.mm_projector."  # the original LLaVA's, inside its LLM state dict
# The input embeddings beside the projector (`mm_use_im_start_end` in stage 1), under the
# original's name in its mm_projector.bin: the whole matrix.
EMBEDDINGS_KEY = "model.embed_tokens.weight"
ADAPTER_FILE = "adapter_model.safetensors"  # PEFT's weights of a LoRA run
ADAPTER_CONFIG = "adapter_config.json"  # and its configuration
# The original LLaVA's mlp2x_gelu is nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
FROM_LLAVA = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias",
              "2.weight": "linear_2.weight", "2.bias": "linear_2.bias"}
TO_LLAVA = {ours: theirs for theirs, ours in FROM_LLAVA.items()}
# Its `linear` is one nn.Linear: in the stock layout linear_1, with linear_2 the identity.
FROM_LLAVA_LINEAR = {"weight": "linear_1.weight", "bias": "linear_1.bias"}
# Prefixes a projector file may carry (stripped on reading).
_FILE_PREFIXES = ("model.mm_projector.", "mm_projector.", "model.multi_modal_projector.",
                  PROJECTOR_PREFIX)
# Where the projector sits in each kind of safetensors file. PEFT stores the trained
# `modules_to_save` copy without its `modules_to_save.default.` part; older PEFT kept it.
_ADAPTER_PREFIXES = ("base_model.model.model.multi_modal_projector.modules_to_save.default.",
                     "base_model.model.model.multi_modal_projector.",
                     "base_model.model.multi_modal_projector.modules_to_save.default.",
                     "base_model.model.multi_modal_projector.")
_MODEL_PREFIXES = (PROJECTOR_PREFIX, "model.multi_modal_projector.")  # legacy, then v5 names


class ProjectorParts(NamedTuple):
    """What a projector file holds: the projector, and what may sit beside it."""

    state: dict[str, Any]  # keyed `linear_1.weight`, …
    position: Any = None  # the vision tower's position embedding (tune_vit_pos_embedding)
    embeddings: Any = None  # the LLM's input embeddings (mm_use_im_start_end, stage 1)


def read_projector_file(file: str | Path) -> dict[str, Any]:
    """Projector tensors from our safetensors or LLaVA's `mm_projector.bin`, keyed
    `linear_1.weight`, … . A file that also holds a vision tower's position embedding or the
    input embeddings is refused here (nothing would carry them on): `read_projector_parts`
    reads them all."""
    parts = read_projector_parts(file)
    if parts.position is not None:
        raise ValueError(f"{file}: holds the vision tower's position embedding beside the "
                         "projector (a tune_vit_pos_embedding run); load it into a model with "
                         "--pretrained-projector, which sets both")
    if parts.embeddings is not None:
        raise ValueError(f"{file}: holds the input embeddings beside the projector (an "
                         "mm_use_im_start_end run); load it into a model with "
                         "--pretrained-projector and --set mm_use_im_start_end=true")
    return parts.state


def read_projector_parts(file: str | Path) -> ProjectorParts:
    """The projector tensors and what sits beside them. Forks with InternVL's
    `tune_vit_pos_embedding` save the tower's position embedding into `mm_projector.bin`
    under its full parameter name (`…vision_tower…embeddings.position_embedding[.weight]`);
    with `mm_use_im_start_end` the original saves `model.embed_tokens.weight` there (so do
    we, in projector.safetensors). Pickles load with `weights_only=True`: no code ever runs."""
    out, positions, embeddings = {}, [], None
    for key, tensor in _read_tensors(Path(file)).items():
        if key == EMBEDDINGS_KEY:
            embeddings = tensor
            continue
        if _is_position_embedding(key):
            positions.append(tensor)
            continue
        short = _strip(key, _FILE_PREFIXES) or key
        out[FROM_LLAVA.get(short, FROM_LLAVA_LINEAR.get(short, short))] = tensor
    if len(positions) > 1:
        raise ValueError(f"{file}: holds {len(positions)} position embeddings; a projector "
                         "file carries at most one (its vision tower's)")
    if not out:
        raise ValueError(f"{file}: no projector tensors found")
    return ProjectorParts(out, positions[0] if positions else None, embeddings)


def _is_position_embedding(key: str) -> bool:
    return ("vision_tower" in key or "vision_model" in key) and key.endswith(
        ("embeddings.position_embedding.weight", "embeddings.position_embedding"))


def _read_tensors(file: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    if not file.is_file():
        raise ValueError(f"projector file {str(file)!r} not found")
    if file.suffix == ".safetensors":
        with weight_file_named(file):
            state = load_file(str(file))
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle errors have many types
            raise ValueError(f"{file}: not a plain tensor file; refusing to unpickle arbitrary "
                             f"objects ({err})") from err
    if not isinstance(state, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor)
            for key, value in state.items()):
        raise ValueError(f"projector file {str(file)!r} holds a {type(state).__name__}, not a "
                         "mapping of tensor names to tensors (LLaVA's mm_projector.bin or our "
                         "projector.safetensors)")
    return state


def write_projector_file(state: dict[str, Any], file: str | Path) -> Path:
    """Write projector tensors (already under their on-disk names) as safetensors, atomically."""
    from safetensors.torch import save_file

    return write_atomically(file, lambda path: save_file(state, str(path),
                                                         metadata={"format": "pt"}))


def write_llava_projector(state: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """Write `linear_1.weight`, … as the original LLaVA's `mm_projector.bin` (its
    `mlp2x_gelu` or, for a single-linear projector, its `linear` keys); returns what was
    written (under the original's key names)."""
    import torch

    if is_single_linear_state(state):  # LLaVA's `linear`: one nn.Linear, as it names it
        written = {LLAVA_PREFIX + "weight": state["linear_1.weight"],
                   LLAVA_PREFIX + "bias": state["linear_1.bias"]}
    else:
        written = {LLAVA_PREFIX + TO_LLAVA[k]: v for k, v in state.items()}
    write_atomically(file, lambda path: torch.save(written, path))
    return written


def is_single_linear_state(state: dict[str, Any]) -> bool:
    """Projector tensors of LLaVA's `linear` in the stock layout: linear_2 exactly the
    identity with a zero bias (what `model.build` makes and training never changes; a
    trained mlp2x_gelu is never exactly that). The tensors are all an export sees."""
    import torch

    second, bias = state.get("linear_2.weight"), state.get("linear_2.bias")
    if second is None or bias is None or second.ndim != 2 or second.shape[0] != second.shape[1]:
        return False
    return bool(torch.equal(second, torch.eye(second.shape[0], dtype=second.dtype))
                and not bias.any())


def read_adapter_projector(file: str | Path) -> dict[str, Any]:
    """The projector trained alongside a LoRA adapter (PEFT `modules_to_save`)."""
    from safetensors import safe_open

    with weight_file_named(file), safe_open(str(file), "pt") as handle:
        state = _pick(handle, list(handle.keys()), _ADAPTER_PREFIXES)
    if not state:
        raise ValueError(f"{file}: this LoRA adapter holds no projector (it was trained with "
                         "the projector frozen); export the projector from the run's base")
    return state


def read_model_projector(folder: Path, name: str) -> dict[str, Any]:
    """Projector tensors of an HF checkpoint, opening only the shard(s) that hold them."""
    from safetensors import safe_open

    if name.endswith(".json"):
        weight_map = json.loads((folder / name).read_text()).get("weight_map", {})
        files = sorted({f for k, f in weight_map.items() if _strip(k, _MODEL_PREFIXES)})
    else:
        files = [name]
    state: dict[str, Any] = {}
    for file in files:
        with weight_file_named(folder / file), safe_open(str(folder / file), "pt") as handle:
            state.update(_pick(handle, list(handle.keys()), _MODEL_PREFIXES))
    if not state:
        raise ValueError(f"{folder / name}: no multi_modal_projector.* tensors (not a LLaVA "
                         "checkpoint?)")
    return state


def projector_from_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
    """The projector tensors of any output or file, keyed `linear_1.weight`, …, and where they
    came from: a pretrain output, an HF-layout checkpoint (single file or sharded), a LoRA run
    or its checkpoint-N, a folder with LLaVA's `mm_projector.bin`, or a projector file."""
    path = Path(checkpoint)
    if path.is_file():
        return read_projector_file(path), str(path.resolve())
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} not found")
    if (path / ADAPTER_FILE).is_file():
        return read_adapter_projector(path / ADAPTER_FILE), str((path / ADAPTER_FILE).resolve())
    for name in (PROJECTOR_FILE, "mm_projector.bin"):
        if (path / name).is_file():
            return read_projector_file(path / name), str((path / name).resolve())
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (path / name).is_file():
            return read_model_projector(path, name), str((path / name).resolve())
    raise ValueError(
        f"{path}: no projector found (looked for {ADAPTER_FILE}, {PROJECTOR_FILE}, "
        "mm_projector.bin, model.safetensors[.index.json]); pass a pretrain, finetune, "
        "merged or LoRA output, or an HF-layout LLaVA checkpoint")


def _strip(key: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def _pick(handle: Any, keys: list[str], prefixes: tuple[str, ...]) -> dict[str, Any]:
    # First matching prefix wins, so a stale `original_module` copy is never picked up.
    out = {}
    for key in keys:
        short = _strip(key, prefixes)
        if short is not None and "original_module" not in key and short not in out:
            out[short] = handle.get_tensor(key)
    return out

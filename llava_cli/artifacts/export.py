"""Export a trained projector: LLaVA's `mm_projector.bin` or our safetensors layout.

The projector is read straight from the files on disk (only its four tensors are loaded, never
the whole model), from any of: a `pretrain` output (`projector.safetensors`), an HF-layout
LLaVA checkpoint (full finetune, merged model, llava-hf; single file or sharded with an
index), a LoRA run or its checkpoint-N (the `modules_to_save` copy in the adapter), a folder
with LLaVA's `mm_projector.bin`, or a projector file itself (to convert between formats).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.checkpoints import PROJECTOR_FILE, PROJECTOR_PREFIX, read_projector_file

LLAVA_FORMAT = "llava"
SAFETENSORS_FORMAT = "safetensors"
FORMATS = (LLAVA_FORMAT, SAFETENSORS_FORMAT)
_SUFFIX_FORMATS = {".bin": LLAVA_FORMAT, ".pt": LLAVA_FORMAT, ".pth": LLAVA_FORMAT,
                   ".safetensors": SAFETENSORS_FORMAT}
# Ours → the original LLaVA's nn.Sequential(Linear, GELU, Linear) indices.
_TO_LLAVA = {"linear_1.weight": "0.weight", "linear_1.bias": "0.bias",
             "linear_2.weight": "2.weight", "linear_2.bias": "2.bias"}
LLAVA_PREFIX = "model.mm_projector."
# Where the projector sits in each kind of safetensors file. PEFT stores the trained
# `modules_to_save` copy without its `modules_to_save.default.` part; older PEFT kept it.
_ADAPTER_PREFIXES = ("base_model.model.model.multi_modal_projector.modules_to_save.default.",
                     "base_model.model.model.multi_modal_projector.",
                     "base_model.model.multi_modal_projector.modules_to_save.default.",
                     "base_model.model.multi_modal_projector.")
_MODEL_PREFIXES = (PROJECTOR_PREFIX, "model.multi_modal_projector.")  # legacy, then v5 names
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class ExportResult:
    """What was written."""

    output: Path
    format: str
    source: str
    keys: list[str]
    sidecar: Path | None = None


def projector_from_checkpoint(checkpoint: str | Path) -> tuple[dict[str, Any], str]:
    """The projector tensors of `checkpoint` keyed `linear_1.weight`, …, and where they came
    from (a file path, for messages and the sidecar JSON)."""
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
            return _read_model_projector(path, name), str((path / name).resolve())
    raise ValueError(
        f"{path}: no projector found (looked for {ADAPTER_FILE}, {PROJECTOR_FILE}, "
        "mm_projector.bin, model.safetensors[.index.json]); pass a pretrain, finetune, "
        "merged or LoRA output, or an HF-layout LLaVA checkpoint")


def read_adapter_projector(file: str | Path) -> dict[str, Any]:
    """The projector trained alongside a LoRA adapter (PEFT `modules_to_save`)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        keys = list(handle.keys())
        state = _pick(handle, keys, _ADAPTER_PREFIXES)
    if not state:
        raise ValueError(f"{file}: this LoRA adapter holds no projector (it was trained with "
                         "the projector frozen); export the projector from the run's base")
    return state


def _read_model_projector(folder: Path, name: str) -> dict[str, Any]:
    """Projector tensors of an HF checkpoint, opening only the shard(s) that hold them."""
    from safetensors import safe_open

    if name.endswith(".json"):
        weight_map = json.loads((folder / name).read_text()).get("weight_map", {})
        files = sorted({f for k, f in weight_map.items() if _strip(k, _MODEL_PREFIXES)})
    else:
        files = [name]
    state: dict[str, Any] = {}
    for file in files:
        with safe_open(str(folder / file), "pt") as handle:
            state.update(_pick(handle, list(handle.keys()), _MODEL_PREFIXES))
    if not state:
        raise ValueError(f"{folder / name}: no multi_modal_projector.* tensors (not a LLaVA "
                         "checkpoint?)")
    return state


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


def resolve_format(output: str | Path, fmt: str | None) -> str:
    """`fmt` if given, else from the extension (.bin/.pt → llava, .safetensors → ours)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(output).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise ValueError(f"cannot tell the format from {str(output)!r}: name it .bin/.pt "
                         "(LLaVA mm_projector.bin) or .safetensors, or pass --format")
    return _SUFFIX_FORMATS[suffix]


def export_projector(checkpoint: str | Path, output: str | Path,
                     fmt: str | None = None) -> ExportResult:
    """Write the projector of `checkpoint` to `output` in `fmt` (see `resolve_format`)."""
    fmt = resolve_format(output, fmt)
    state, source = projector_from_checkpoint(checkpoint)
    _check_mlp2x(state, source)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(state.items())}
    if fmt == LLAVA_FORMAT:
        written = {LLAVA_PREFIX + _TO_LLAVA[k]: v for k, v in state.items()}
        _atomic(output, lambda tmp: _torch_save(written, tmp))
        return ExportResult(output, fmt, source, sorted(written))
    written = {PROJECTOR_PREFIX + k: v for k, v in state.items()}
    _atomic(output, lambda tmp: _save_safetensors(written, tmp))
    sidecar = Path(f"{output}.json")
    info = _describe(state, source)
    _atomic(sidecar, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    return ExportResult(output, fmt, source, sorted(written), sidecar)


def _check_mlp2x(state: dict[str, Any], source: str) -> None:
    unknown = sorted(set(state) - set(_TO_LLAVA))
    if unknown or not {"linear_1.weight", "linear_2.weight"} <= set(state):
        raise ValueError(f"{source}: projector keys {sorted(state)} are not an mlp2x_gelu "
                         "projector (linear_1/linear_2); cannot export it in LLaVA's layout")


def _describe(state: dict[str, Any], source: str) -> dict[str, Any]:
    first, second = state["linear_1.weight"], state["linear_2.weight"]
    return {"projector_type": "mlp2x_gelu", "in_features": int(first.shape[1]),
            "hidden_features": int(first.shape[0]), "out_features": int(second.shape[0]),
            "bias": "linear_1.bias" in state, "dtype": str(first.dtype).removeprefix("torch."),
            "source": source}


def _torch_save(state: dict[str, Any], file: Path) -> None:
    import torch

    torch.save(state, file)


def _save_safetensors(state: dict[str, Any], file: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(file), metadata={"format": "pt"})


def _atomic(target: Path, write: Any) -> None:
    """Write through a temporary file next to `target`: a crash never leaves half a file."""
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)

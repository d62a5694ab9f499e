"""Export a trained projector: LLaVA's `mm_projector.bin` or our safetensors layout.

The projector is read straight from the files on disk (only its four tensors are loaded, never
the whole model), from any of: a `pretrain` output (`projector.safetensors`), an HF-layout
LLaVA checkpoint (full finetune, merged model, llava-hf; single file or sharded with an
index), a LoRA run or its checkpoint-N (the `modules_to_save` copy in the adapter), a folder
with LLaVA's `mm_projector.bin`, or a projector file itself (to convert between formats).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.artifacts.files import write_text_atomically
from llava_cli.artifacts.output_dir import refuse_existing_file
from llava_cli.artifacts.projector_file import (
    PROJECTOR_PREFIX,
    TO_LLAVA,
    is_single_linear_state,
    projector_from_checkpoint,
    write_llava_projector,
    write_projector_file,
)

LLAVA_FORMAT = "llava"
SAFETENSORS_FORMAT = "safetensors"
FORMATS = (LLAVA_FORMAT, SAFETENSORS_FORMAT)
_SUFFIX_FORMATS = {".bin": LLAVA_FORMAT, ".pt": LLAVA_FORMAT, ".pth": LLAVA_FORMAT,
                   ".safetensors": SAFETENSORS_FORMAT}


@dataclass
class ExportResult:
    """What was written."""

    output: Path
    format: str
    source: str
    keys: list[str]
    sidecar: Path | None = None


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


def _inputs(checkpoint: Path) -> tuple[dict[str, str | None], dict[str, str | None] | None]:
    """What the output may never be: the checkpoint (a projector file), or any file already in
    the checkpoint folder, whatever --overwrite says. A new file inside the folder is allowed:
    LLaVA's stage-2 scripts read `PRETRAIN_OUTPUT/mm_projector.bin` (its original layout)."""
    if not checkpoint.is_dir():
        return {"checkpoint": str(checkpoint)}, None
    files = {f"checkpoint file {p.name}": str(p) for p in sorted(checkpoint.iterdir())
             if p.is_file()}
    return files, {"checkpoint": str(checkpoint)}


def export_projector(checkpoint: str | Path, output: str | Path,
                     fmt: str | None = None, overwrite: bool = False) -> ExportResult:
    """Write the projector of `checkpoint` to `output` in `fmt` (see `resolve_format`); an
    existing file (or its safetensors description) is replaced only with `overwrite`."""
    output = Path(output)
    inputs, may_hold = _inputs(Path(checkpoint))
    refuse_existing_file(output, overwrite, inputs, may_hold)
    fmt = resolve_format(output, fmt)
    if fmt == SAFETENSORS_FORMAT:
        refuse_existing_file(Path(f"{output}.json"), overwrite, inputs, may_hold)
    state, source = projector_from_checkpoint(checkpoint)
    _check_mlp2x(state, source)
    output.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sorted(state.items())}
    if fmt == LLAVA_FORMAT:
        written = write_llava_projector(state, output)
        return ExportResult(output, fmt, source, sorted(written))
    written = {PROJECTOR_PREFIX + k: v for k, v in state.items()}
    write_projector_file(written, output)
    sidecar = Path(f"{output}.json")
    write_text_atomically(sidecar, json.dumps(_describe(state, source), indent=2) + "\n")
    return ExportResult(output, fmt, source, sorted(written), sidecar)


def _check_mlp2x(state: dict[str, Any], source: str) -> None:
    unknown = sorted(set(state) - set(TO_LLAVA))
    if unknown or not {"linear_1.weight", "linear_2.weight"} <= set(state):
        raise ValueError(f"{source}: projector keys {sorted(state)} are not an mlp2x_gelu "
                         "projector (linear_1/linear_2); cannot export it in LLaVA's layout")


def _describe(state: dict[str, Any], source: str) -> dict[str, Any]:
    first, second = state["linear_1.weight"], state["linear_2.weight"]
    kind = "linear" if is_single_linear_state(state) else "mlp2x_gelu"
    return {"projector_type": kind, "in_features": int(first.shape[1]),
            "hidden_features": int(first.shape[0]), "out_features": int(second.shape[0]),
            "bias": "linear_1.bias" in state, "dtype": str(first.dtype).removeprefix("torch."),
            "source": source}

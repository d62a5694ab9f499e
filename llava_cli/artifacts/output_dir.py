"""The rules for a directory a command writes: where it may write, and what an earlier output
left there that would shadow or mix with the new one."""

from __future__ import annotations

from pathlib import Path

from llava_cli.artifacts.manifest import MANIFEST_NAME
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG, PROJECTOR_FILE

CHECKPOINT_PREFIX = "checkpoint-"
BASE_DIR = "base"  # random-init pretrain runs keep their (unrecoverable) initial weights here
# Weight files a previous model may have left that a loader would pick up instead of (or
# mixed with) the new ones.
STALE_WEIGHTS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                 "pytorch_model.bin.index.json")
# A previous run's outputs of any kind (e.g. an old adapter next to a new full model).
STALE_RUN_OUTPUTS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model.*",
                     ADAPTER_CONFIG, PROJECTOR_FILE, MANIFEST_NAME)


def refuse_unsafe_output_dir(out: Path, allow_non_empty: bool,
                             remedy: str = "pass --overwrite to write into it") -> None:
    """The one rule for every command that writes a directory: never into a file, never into
    a non-empty directory unless the user allowed it (`remedy` says how)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not allow_non_empty:
        raise ValueError(f"output directory {str(out)!r} is not empty; {remedy}")


def refuse_existing_file(target: Path, overwrite: bool) -> None:
    """The one rule for every file a command writes: never onto a directory, never over an
    existing file unless the user passed --overwrite."""
    if target.is_dir():
        raise ValueError(f"{str(target)!r} is a directory; give a file name to write")
    if target.exists() and not overwrite:
        raise ValueError(f"{str(target)!r} exists; pass --overwrite to replace it")


def remove_stale(out: Path, patterns: tuple[str, ...]) -> None:
    """Delete the files in `out` matching `patterns` (other files are left alone)."""
    for pattern in patterns:
        for stale in out.glob(pattern):
            stale.unlink()

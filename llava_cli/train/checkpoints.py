"""Checkpoints that are complete or absent.

The Trainer writes `checkpoint-N` in place, file after file: a kill, Ctrl-C or a full disk
part-way leaves a folder without `trainer_state.json` that resume would then pick and crash on.
Here each checkpoint is written under a hidden staging folder (`.saving-checkpoint-N/`, which
no checkpoint lookup matches) and renamed to `checkpoint-N` once every rank has finished
writing it; resume takes the newest *complete* one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from llava_cli.artifacts.files import give_usual_modes
from llava_cli.artifacts.output_dir import CHECKPOINT_PREFIX

STAGING_PREFIX = ".saving-"
REPLACED_PREFIX = ".replaced-"
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: a checkpoint's completion
INCOMPLETE_SENTINEL = "checkpoint-is-incomplete.txt"  # transformers' JIT checkpoints
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def staging_root(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The hidden folder the Trainer writes `checkpoint-<step>` into."""
    return Path(run_dir) / f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{step}"


def publish_checkpoint(run_dir: str | os.PathLike[str], step: int) -> Path:
    """Rename the staged `checkpoint-<step>` into `run_dir` (an earlier one of that step is
    replaced only once the new one is in place); returns the published folder. Its files
    get the modes a plain write would give (safetensors writes them private)."""
    root = staging_root(run_dir, step)
    give_usual_modes(root / f"{CHECKPOINT_PREFIX}{step}")
    name = f"{CHECKPOINT_PREFIX}{step}"
    target = Path(run_dir) / name
    replaced = Path(run_dir) / f"{REPLACED_PREFIX}{name}"
    if target.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(target, replaced)
    os.rename(root / name, target)
    shutil.rmtree(replaced, ignore_errors=True)
    root.rmdir()
    return target


def discard_staging(run_dir: str | os.PathLike[str], step: int | None = None) -> None:
    """Remove a staged checkpoint (all of them when `step` is None): never a complete one."""
    pattern = f"{STAGING_PREFIX}{CHECKPOINT_PREFIX}{'*' if step is None else step}"
    for stale in Path(run_dir).glob(pattern):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in Path(run_dir).glob(f"{REPLACED_PREFIX}{CHECKPOINT_PREFIX}*"):
        original = stale.with_name(stale.name.removeprefix(REPLACED_PREFIX))
        if original.exists():
            shutil.rmtree(stale, ignore_errors=True)
        else:  # killed between `publish_checkpoint`'s two renames: the old one is complete
            os.rename(stale, original)


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint the Trainer finished writing."""
    finished = (checkpoint / TRAINER_STATE).is_file()
    return finished and not (checkpoint / INCOMPLETE_SENTINEL).exists()


def checkpoints_by_step(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder in `run_dir`, oldest step first."""
    found = []
    for path in Path(run_dir).iterdir() if Path(run_dir).is_dir() else ():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def newest_complete_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint of the highest step, or None."""
    complete = [path for _, path in checkpoints_by_step(run_dir) if is_complete(path)]
    return complete[-1] if complete else None


def clear_previous_checkpoints(run_dir: str | os.PathLike[str]) -> list[str]:
    """Delete a previous run's checkpoints (complete and staged); returns their names. Called
    by an --overwrite run once its own configuration, data and model are known to be good,
    so that `--resume latest` can never continue the previous run."""
    names = [path.name for _, path in checkpoints_by_step(run_dir)]
    for name in names:
        shutil.rmtree(Path(run_dir) / name)
    discard_staging(run_dir)
    return names

"""Whether a LoRA run's base is still the one it was trained on: the fingerprint of the
base's weight files, recorded in the run's manifest, against the files there now.

An adapter belongs to the weights it was trained on: on a base retrained or overwritten since
(even by `merge-lora -o BASE --overwrite`) it would answer from other weights, or get its
delta a second time. `merge-lora`, `generate` and `evaluate` all check here, so a changed
base is refused the same way by each.
"""

from __future__ import annotations

from pathlib import Path

from llava_cli.artifacts.manifest import (
    MANIFEST_NAME,
    Base,
    PartsBase,
    base_fingerprint,
)

MERGE_REMEDY = "pass the original base with --base, or re-train the LoRA run on this one"


def fingerprinted(run_root: Path, recorded: Base, base: Base, explicit: bool,
                  flag: str = "--base", remedy: str = MERGE_REMEDY) -> Base:
    """`base` with the fingerprint of its weight files, refused when the run recorded another:
    the adapter belongs to the weights it was trained on (a base retrained or overwritten
    since, even by `merge-lora -o BASE --overwrite`, would get the delta a second time).
    `explicit`: `base` is the user's `flag` (merge-lora's --base, generate's CHECKPOINT).
    `remedy`: what to do, in the command's words. Without a recorded fingerprint (older runs,
    hub ids) there is nothing to check."""
    expected = getattr(recorded, "fingerprint", None)
    if explicit and expected and _composed(recorded):
        raise ValueError(f"--base {base.path}: {run_root} was trained on a base composed at "
                         f"training time ({_describe(recorded)}), which no single checkpoint "
                         "can be checked against; drop --base (the recorded parts are rebuilt "
                         "and checked)")
    if not (expected or explicit):
        return base
    found = base_fingerprint(base)
    if expected and found != expected:
        raise ValueError(_changed(run_root, base, explicit, found is None, flag, remedy))
    return base.model_copy(update={"fingerprint": found})


def _composed(base: Base) -> bool:
    """A base built at training time, not loaded from one checkpoint folder as it is."""
    return isinstance(base, PartsBase) or getattr(base, "pretrained_projector", None) is not None


def _describe(base: Base) -> str:
    if isinstance(base, PartsBase):
        where = f"LLM {base.llm} + vision tower {base.vision_tower}"
    else:
        where = getattr(base, "path", str(base))
    projector = getattr(base, "pretrained_projector", None)
    return f"{where} + projector {projector}" if projector else where


def _changed(run_root: Path, base: Base, explicit: bool, gone: bool, flag: str,
             remedy: str) -> str:
    what = f"{flag} {_describe(base)}" if explicit else f"the base {_describe(base)}"
    if gone:
        problem = "has no weight files to check against"
    elif explicit:
        problem = "is not the base the run was trained on: its weight files differ from"
    else:
        problem = "has changed since the run was trained: its weight files differ from"
    return (f"{what} {problem} the fingerprint in {run_root / MANIFEST_NAME}, so the adapter "
            f"would be applied to other weights; {remedy}")

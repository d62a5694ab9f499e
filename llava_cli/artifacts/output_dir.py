"""The rules for a directory a command writes: where it may write, and what an earlier output
left there that would shadow or mix with the new one."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from llava_cli.artifacts.files import give_usual_modes, write_text_atomically
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


LOCK_NAME = ".llava.lock"
STAGING_NAME = ".llava-publishing"  # a command's new outputs, complete before they move in
_OURS = (LOCK_NAME, STAGING_NAME)  # what never makes a directory "not empty"


def refuse_unsafe_output_dir(out: Path, allow_non_empty: bool,
                             remedy: str = "pass --overwrite to write into it") -> None:
    """The one rule for every command that writes a directory: never into a file, never into
    a non-empty directory unless the user allowed it (`remedy` says how)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    if out.is_dir() and not allow_non_empty and any(
            p.name not in _OURS for p in out.iterdir()):
        raise ValueError(f"output directory {str(out)!r} is not empty; {remedy}")


def refuse_overlap(out: Path, inputs: Mapping[str, str | None],
                   may_hold_output: Mapping[str, str | None] | None = None,
                   what: str = "output directory") -> None:
    """An output directory that is, contains or lies inside one of the command's `inputs`
    (label → path; hub ids and missing paths are skipped) is refused: writing or clearing it
    could destroy what the command reads, and outputs inside a model folder would become part
    of it. `may_hold_output` are inputs an output may lie inside (an image folder: `-o` under
    `--image-folder .` touches no image), but not be or contain. `what` names the output in
    the error (a vision feature cache is an output directory too)."""
    _refuse_relations(out, what, f"{'an' if what[0] in 'aeiou' else 'a'} {what}", inputs,
                      may_hold_output)


def refuse_output_over_inputs(target: Path, inputs: Mapping[str, str | None],
                              may_hold_output: Mapping[str, str | None] | None = None) -> None:
    """The same rule for an output FILE: one that is an input file (also through a link, also
    with --overwrite) or lies inside an input folder is refused (`refuse_overlap`)."""
    _refuse_relations(target, "output file", "an output file", inputs, may_hold_output)


def _refuse_relations(out: Path, what: str, choose: str, inputs: Mapping[str, str | None],
                      may_hold_output: Mapping[str, str | None] | None) -> None:
    for label, given in {**inputs, **(may_hold_output or {})}.items():
        relation = _relation(out, given)
        if relation == "lies inside" and label in (may_hold_output or {}):
            continue
        if relation:
            raise ValueError(f"{what} {str(out)!r} {relation} the {label} {given!r}; "
                             f"choose {choose} apart from every input")


def _relation(out: Path, given: str | None) -> str | None:
    if not given or not Path(given).exists():
        return None
    where, source = out.resolve(), Path(given).resolve()
    if where == source:
        return "is"
    if where in source.parents:
        return "contains"
    return "lies inside" if source in where.parents else None


@contextmanager
def output_lock(out: Path, held: bool = True) -> Iterator[None]:
    """Hold `out/.llava.lock` (an advisory lock the system drops when the process dies) for
    the block, so that two runs can never write into one directory; `held=False` (the other
    ranks of a distributed run, whose rank 0 holds it) does nothing. A directory the block
    created and left empty is removed again."""
    if not held:
        yield
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out) as handle:
            try:
                yield
            finally:
                # Unlinked while held: a run that opened the old file meanwhile finds it gone
                # from the directory once it holds it, and tries again (`_locked`).
                (out / LOCK_NAME).unlink(missing_ok=True)
                handle.close()
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


@contextmanager
def _locked(out: Path) -> Iterator[IO[str]]:
    """The open, locked lock file of `out`: locked AND still the file the directory names."""
    import fcntl

    for _ in range(100):  # each retry means another run released it just now
        handle = open(out / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held past here
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ValueError(f"output directory {str(out)!r} is in use by another run "
                             f"({holder}); wait for it to end or choose another "
                             "--output-dir") from None
        if _names_this_file(handle, out / LOCK_NAME):
            break
        handle.close()
    else:
        raise ValueError(f"output directory {str(out)!r}: its lock keeps changing hands; "
                         "wait for the other runs to end")
    _write_holder(handle)
    yield handle


def _names_this_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _write_holder(handle: IO[str]) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()


@contextmanager
def publishing(out: Path, stale: tuple[str, ...], inputs: Mapping[str, str | None] | None = None,
               may_hold_output: Mapping[str, str | None] | None = None,
               overwrite: bool = False, remedy: str = "pass --overwrite to write into it",
               held: bool = True) -> Iterator[Path]:
    """The one way a command writes an output directory; yields the staging folder to write
    the new outputs into.

    In order: refuse an `out` that is, contains or lies inside one of `inputs`
    (`refuse_overlap`; before anything is created), lock `out` (`output_lock`), refuse a
    non-empty `out` unless `overwrite` (`remedy` says how to allow it), empty the staging
    folder a killed command left. When the block ends without an error the staged outputs are
    published (`publish_staged`: `stale` files of an earlier output go once the new ones are
    in, the manifest comes last); on an error the staging folder is removed and `out` keeps
    what it held. `held=False` (the other ranks of a distributed run: rank 0 holds the lock
    and publishes) only yields the staging folder's path and cleans up after an error.
    """
    refuse_overlap(out, inputs or {}, may_hold_output)
    with output_lock(out, held=held):
        refuse_unsafe_output_dir(out, overwrite, remedy)
        staging = fresh_staging(out) if held else out / STAGING_NAME
        try:
            yield staging
            if held:
                publish_staged(staging, out, stale)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)  # a full disk: free what it took
            raise


def drop_custom_code(folder: Path) -> None:
    """Our outputs are stock transformers classes: the `auto_map` entries an input's config
    carried (references to custom code shipped with it, at any depth: a text or vision config
    too) are dropped from every `config.json` under `folder`."""
    for file in sorted(folder.rglob("config.json")):
        config = json.loads(file.read_text(encoding="utf-8"))
        if _without_auto_map(config):
            write_text_atomically(file, json.dumps(config, indent=2, sort_keys=True) + "\n")


def _without_auto_map(value: object) -> bool:
    """Remove every `auto_map` key from the JSON `value` in place; whether any was there."""
    found = False
    if isinstance(value, dict):
        found = value.pop("auto_map", None) is not None
        for inner in value.values():
            found = _without_auto_map(inner) or found
    elif isinstance(value, list):
        for inner in value:
            found = _without_auto_map(inner) or found
    return found


def fresh_staging(out: Path) -> Path:
    """The one staging folder of the (locked) `out`, emptied of what a killed command left:
    new outputs are complete there before `publish_staged` moves them in."""
    staging = out / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish_staged(staging: Path, out: Path, stale: tuple[str, ...]) -> None:
    """Move a command's complete new outputs from `staging` into `out`, then delete what a
    previous output left there matching `stale` (so nothing is deleted before the new work
    exists). The old manifest goes first and the new one comes last: a folder with a
    manifest is always a complete output. Everything published is readable as a plain write
    would make it (`give_usual_modes`: safetensors writes its files private)."""
    give_usual_modes(staging)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    new = {item.name for item in staging.iterdir()}
    for item in staging.iterdir():
        if item.name != MANIFEST_NAME:
            _move_into(item, out / item.name)
    for pattern in stale:  # before the manifest: it marks a folder as complete AND clean
        for old in out.glob(pattern):
            if old.name not in new:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if (staging / MANIFEST_NAME).exists():
        os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
    staging.rmdir()


def _move_into(item: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        replaced = target.with_name(f".replaced-{target.name}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(target, replaced)
        os.rename(item, target)
        shutil.rmtree(replaced)
    else:
        os.replace(item, target)


def refuse_existing_file(target: Path, overwrite: bool,
                         inputs: Mapping[str, str | None] | None = None,
                         may_hold_output: Mapping[str, str | None] | None = None) -> None:
    """The one rule for every file a command writes: never onto a directory, never over or
    inside one of the command's `inputs` (label → path: `refuse_output_over_inputs`,
    whatever `overwrite` says), never over an existing file unless the user passed
    --overwrite."""
    if target.is_dir():
        raise ValueError(f"{str(target)!r} is a directory; give a file name to write")
    refuse_output_over_inputs(target, inputs or {}, may_hold_output)
    if target.exists() and not overwrite:
        raise ValueError(f"{str(target)!r} exists; pass --overwrite to replace it")

"""The publishing mechanisms at their edges: the order in which a complete output appears,
the lock file changing hands, a checkpoint replaced by the same step, the boundary when even
its traceback file cannot be written."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from typer.testing import CliRunner

from llava_cli.artifacts import output_dir as output_dir_module
from llava_cli.artifacts.manifest import MANIFEST_NAME
from llava_cli.artifacts.output_dir import (
    LOCK_NAME,
    STALE_RUN_OUTPUTS,
    _names_this_file,
    output_lock,
    publish_staged,
)
from llava_cli.commands.boundary import guarded
from llava_cli.train.checkpoints import discard_staging, newest_complete_checkpoint


def test_the_manifest_appears_only_once_stale_files_are_gone(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    staging.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", MANIFEST_NAME):
        (out / name).write_text("old")
    for name in ("model.safetensors", "config.json", MANIFEST_NAME):
        (staging / name).write_text("new")
    seen_when_manifest_lands = []
    replace = os.replace

    def watching(source, target):
        if Path(target).name == MANIFEST_NAME:
            seen_when_manifest_lands.append(sorted(p.name for p in out.iterdir()))
        replace(source, target)

    monkeypatch.setattr(output_dir_module.os, "replace", watching)
    publish_staged(staging, out, STALE_RUN_OUTPUTS)
    assert seen_when_manifest_lands == [["config.json", "model.safetensors"]]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "llava_run.json",
                                                     "model.safetensors"]
    assert (out / MANIFEST_NAME).read_text() == "new" and not staging.exists()


def test_a_lock_file_unlinked_by_its_holder_is_not_the_lock_any_more(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / LOCK_NAME, "a+") as stale:
        (out / LOCK_NAME).unlink()  # what a finishing holder does
        assert not _names_this_file(stale, out / LOCK_NAME)
        with output_lock(out):  # a new file, locked and named by the directory
            assert (out / LOCK_NAME).read_text() == f"pid {os.getpid()}"
    assert not (out / LOCK_NAME).exists()


def test_a_checkpoint_replaced_by_the_same_step_survives_a_kill_between_the_renames(tmp_path):
    old = tmp_path / ".replaced-checkpoint-4"  # renamed aside; the new one never moved in
    old.mkdir()
    (old / "trainer_state.json").write_text("{}")
    (tmp_path / ".saving-checkpoint-4").mkdir()
    discard_staging(tmp_path)
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_the_boundary_survives_a_traceback_file_it_cannot_write(monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "no-such-dir"))

    def command() -> None:
        raise TypeError("boom")

    probe = typer.Typer()
    probe.command("probe")(guarded("probe", command))
    probe.command("other")(lambda: None)
    result = CliRunner().invoke(probe, ["probe"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "its traceback could not be saved" in result.stderr

"""The one publishing rule for an output directory (`publishing`), the one overlap rule for an
output file (`refuse_existing_file(inputs=...)`), file modes under the umask, custom-code
references dropped from configs, and damaged weight files named."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava_cli.artifacts.files import give_usual_modes, usual_mode, write_atomically
from llava_cli.artifacts.manifest import MANIFEST_NAME
from llava_cli.artifacts.output_dir import (
    LOCK_NAME,
    STAGING_NAME,
    STALE_RUN_OUTPUTS,
    drop_custom_code,
    publishing,
    refuse_existing_file,
)
from llava_cli.artifacts.projector_file import read_projector_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_publishing_moves_complete_outputs_in_manifest_last_readable(tmp_path, umask_022):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("old adapter")  # stale: replaced by kind
    (out / "notes.txt").write_text("the user's")
    with publishing(out, STALE_RUN_OUTPUTS, overwrite=True) as staging:
        assert staging == out / STAGING_NAME and (out / LOCK_NAME).is_file()
        save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))  # written 0600
        (staging / "tower").mkdir(mode=0o700)  # as tempfile.mkdtemp makes folders
        (staging / "tower" / "config.json").write_text("{}")
        os.chmod(staging / "tower" / "config.json", 0o600)
        (staging / MANIFEST_NAME).write_text("{}")
        assert not (out / MANIFEST_NAME).exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "model.safetensors",
                                                     "notes.txt", "tower"]
    assert (out / "notes.txt").read_text() == "the user's"
    for name in ("model.safetensors", MANIFEST_NAME, "tower/config.json"):
        assert _mode(out / name) == 0o644, name
    assert _mode(out / "tower") == 0o755


def test_publishing_that_fails_leaves_the_directory_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("previous model")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="verification"), \
            publishing(out, STALE_RUN_OUTPUTS, overwrite=True) as staging:
        (staging / "model.safetensors").write_text("new, unverified")
        raise RuntimeError("verification failed")
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == [
        "model.safetensors"]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), publishing(fresh, STALE_RUN_OUTPUTS):
        raise RuntimeError("boom")
    assert not fresh.exists()  # created by the block, left empty: removed


def test_publishing_refuses_an_output_inside_an_input_before_creating_anything(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = _tree(model)
    for out in (model / "sub", model, tmp_path):
        with pytest.raises(ValueError, match="apart from every input"), \
                publishing(out, STALE_RUN_OUTPUTS, inputs={"model": str(model)}, overwrite=True):
            pytest.fail("the block must not run")
    assert _tree(model) == before and sorted(p.name for p in model.iterdir()) == ["config.json"]


def test_publishing_refuses_a_non_empty_directory_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"), \
            publishing(out, STALE_RUN_OUTPUTS):
        pytest.fail("the block must not run")
    assert sorted(p.name for p in out.iterdir()) == ["x"]


@pytest.mark.parametrize("how", ["same file", "link to it", "inside the folder",
                                 "inside a link to the folder", "folder given by a link"])
def test_an_output_file_over_an_input_is_refused_even_with_overwrite(tmp_path, how):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "alias").symlink_to(model)
    (tmp_path / "link.safetensors").symlink_to(model / "model.safetensors")
    given = str(tmp_path / "alias") if how == "folder given by a link" else str(model)
    target = {"same file": model / "model.safetensors",
              "link to it": tmp_path / "link.safetensors",
              "inside the folder": model / "new.bin",
              "inside a link to the folder": tmp_path / "alias" / "new.bin",
              "folder given by a link": model / "model.safetensors"}[how]
    with pytest.raises(ValueError, match=r"output file .* (is|lies inside) the checkpoint "
                                         r".*; choose an output file apart from every input"):
        refuse_existing_file(target, True, {"checkpoint": given})
    assert (model / "model.safetensors").read_bytes() == b"weights"
    file_input = {"projector": str(model / "model.safetensors")}
    if how in ("same file", "link to it"):
        with pytest.raises(ValueError, match="is the projector"):
            refuse_existing_file(target, True, file_input)


def test_an_output_file_apart_from_the_inputs_follows_the_overwrite_rule(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    target = tmp_path / "p.bin"
    refuse_existing_file(target, False, {"checkpoint": str(model)})
    target.write_text("x")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        refuse_existing_file(target, False, {"checkpoint": str(model)})
    refuse_existing_file(target, True, {"checkpoint": str(model)})


def test_the_atomic_writer_gives_the_mode_the_umask_allows(tmp_path):
    previous = os.umask(0o022)
    try:
        written = write_atomically(tmp_path / "a.safetensors",
                                   lambda p: save_file({"w": torch.zeros(1)}, str(p)))
        assert _mode(written) == 0o644 and usual_mode() == 0o644
        assert usual_mode(directory=True) == 0o755
        os.umask(0o077)  # a user who wants private files keeps them private
        private = write_atomically(tmp_path / "b.safetensors",
                                   lambda p: save_file({"w": torch.zeros(1)}, str(p)))
        assert _mode(private) == 0o600
    finally:
        os.umask(previous)


def test_usual_modes_never_follow_a_link(tmp_path, umask_022):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    (folder / "link").symlink_to(outside)
    give_usual_modes(folder)
    assert _mode(folder) == 0o755 and _mode(outside) == 0o600


def test_custom_code_references_are_dropped_from_every_config(tmp_path):
    config = {"model_type": "llava", "auto_map": {"AutoModelForCausalLM": "foreign.Model"},
              "text_config": {"model_type": "llama", "auto_map": {"AutoConfig": "x.C"}},
              "vision_config": {"model_type": "clip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tower").mkdir()
    (tmp_path / "tower" / "config.json").write_text(json.dumps({"auto_map": {"a": "b"}}))
    untouched = '{"model_type": "clip",   "hidden_size": 8}'
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(untouched)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"t": "u"}}))
    drop_custom_code(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "llava", "text_config": {"model_type": "llama"},
        "vision_config": {"model_type": "clip_vision_model"}}
    assert json.loads((tmp_path / "tower" / "config.json").read_text()) == {}
    assert (tmp_path / "other" / "config.json").read_text() == untouched  # not rewritten
    assert "auto_map" in (tmp_path / "tokenizer_config.json").read_text()  # configs only


def test_a_truncated_weight_file_is_named(tmp_path):
    file = tmp_path / "projector.safetensors"
    save_file({"model.multi_modal_projector.linear_1.weight": torch.zeros(4, 4)}, str(file))
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(ValueError) as caught:
        read_projector_file(file)
    message = str(caught.value)
    assert message.startswith(f"{file}: a damaged or truncated weight file (")
    assert "incomplete metadata" in message and "\n" not in message

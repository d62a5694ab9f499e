"""artifacts: atomic writes, the typed run manifest, the projector file formats."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from llava_cli.artifacts.files import atomic_path, write_text_atomically
from llava_cli.artifacts.manifest import (
    MANIFEST_NAME,
    CheckpointBase,
    MergedBase,
    OutputKind,
    PartsBase,
    RunManifest,
    base_fingerprint,
    read_manifest,
    weights_fingerprint,
)
from llava_cli.artifacts.projector_file import (
    FROM_LLAVA,
    TO_LLAVA,
    read_projector_file,
    write_llava_projector,
    write_projector_file,
)


def test_atomic_write_replaces_only_when_complete(tmp_path: Path):
    target = tmp_path / "out.txt"
    write_text_atomically(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "old"  # the previous file survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left
    write_text_atomically(target, "new")
    assert target.read_text() == "new"


def test_atomic_write_has_a_plain_files_permissions(tmp_path: Path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = write_text_atomically(tmp_path / "atomic.txt", "x")
    assert stat.S_IMODE(os.stat(atomic).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)


def test_two_writers_of_one_target_use_different_temporaries(tmp_path: Path):
    target = tmp_path / "cache.npz"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("a")
        second.write_text("b")
    assert target.read_text() in ("a", "b")


# What earlier versions wrote: the three base shapes as plain dicts.
OLD_MANIFEST = {
    "kind": "lora",
    "base": {"type": "merged", "adapter": "/runs/lora",
             "base": {"type": "parts", "llm": "/m/llm", "vision_tower": "/m/clip",
                      "vision_select_layer": -2, "vision_select_feature": "patch",
                      "projector_type": "mlp2x_gelu", "random_init": False,
                      "pretrained_projector": "/runs/pre/projector.safetensors"}},
    "template": "v1", "tokenization": "hf", "image_aspect_ratio": "pad",
    "projector_type": "mlp2x_gelu", "files": ["adapter_model.safetensors"],
    "created": "2026-11-30T10:00:00+00:00", "versions": {"torch": "2.13.0"}, "extra": {},
    "format_version": 1,
}


def test_manifest_reads_earlier_manifests_typed_and_writes_them_back_unchanged(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(OLD_MANIFEST))
    manifest = read_manifest(tmp_path)
    assert manifest.kind is OutputKind.LORA and manifest.kind == "lora"
    assert isinstance(manifest.base, MergedBase) and isinstance(manifest.base.base, PartsBase)
    assert manifest.base.base.pretrained_projector == "/runs/pre/projector.safetensors"
    out = tmp_path / "again"
    out.mkdir()
    manifest.write(out)
    assert json.loads((out / MANIFEST_NAME).read_text()) == OLD_MANIFEST


def test_manifest_errors_are_short_and_name_the_file(tmp_path):
    bad = {**OLD_MANIFEST, "base": {"type": "somewhere", "path": "/x"}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME} is not a valid llava_cli manifest "
                                         r"\(base"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**OLD_MANIFEST, "format_version": 9}))
    with pytest.raises(ValueError, match="newer llava_cli"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path / "nothing-here") is None


def test_checkpoint_base_round_trip(tmp_path):
    manifest = RunManifest(kind=OutputKind.PROJECTOR,
                           base=CheckpointBase(path="base", random_init=True),
                           template="plain", tokenization="hf", image_aspect_ratio="pad")
    manifest.write(tmp_path)
    written = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert written["kind"] == "projector"
    assert written["base"] == {"type": "llava", "path": "base", "random_init": True}
    assert read_manifest(tmp_path).base == CheckpointBase(path="base", random_init=True)


def test_projector_key_maps_are_inverse_and_both_formats_read_back(tmp_path):
    torch = pytest.importorskip("torch")
    assert {v: k for k, v in TO_LLAVA.items()} == FROM_LLAVA
    state = {"linear_1.weight": torch.randn(4, 3), "linear_1.bias": torch.randn(4),
             "linear_2.weight": torch.randn(5, 4), "linear_2.bias": torch.randn(5)}
    written = write_llava_projector(state, tmp_path / "mm_projector.bin")
    assert sorted(written) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                               "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    write_projector_file({f"multi_modal_projector.{k}": v for k, v in state.items()},
                         tmp_path / "projector.safetensors")
    for name in ("mm_projector.bin", "projector.safetensors"):
        back = read_projector_file(tmp_path / name)
        assert set(back) == set(state)
        assert all(torch.equal(back[k], state[k]) for k in state)


def _model_folder(folder: Path, weights: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_fingerprint_is_the_content_of_every_weight_file(tmp_path):
    folder = _model_folder(tmp_path / "m")
    first = weights_fingerprint([str(folder)])
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 64
    # Not its weights: configs, the Trainer's pickled arguments, checkpoint folders.
    (folder / "training_args.bin").write_bytes(b"args")
    (folder / "config.json").write_text('{"changed": 1}')
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"old")
    assert weights_fingerprint([str(folder)]) == first
    # A copy elsewhere has the same fingerprint: content, not paths.
    assert weights_fingerprint([str(_model_folder(tmp_path / "copy"))]) == first
    (folder / "model.safetensors").write_bytes(b"weightz")  # same size, one byte differs
    assert weights_fingerprint([str(folder)]) != first
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "pytorch_model.bin").write_bytes(b"more")
    assert weights_fingerprint([str(folder)]) != first


def test_fingerprint_reads_a_file_past_any_sample(tmp_path):
    big = bytearray(3 * 2**20)
    folder = _model_folder(tmp_path / "big", bytes(big))
    before = weights_fingerprint([str(folder)])
    big[2 * 2**20 + 12345] = 1  # deep inside: a sampled hash would miss it
    (folder / "model.safetensors").write_bytes(bytes(big))
    assert weights_fingerprint([str(folder)]) != before


def test_fingerprint_of_nothing_local_is_none_and_hub_ids_count_by_name(tmp_path):
    folder = _model_folder(tmp_path / "m")
    (tmp_path / "config-only").mkdir()
    assert weights_fingerprint([]) is None
    assert weights_fingerprint(["org/hub-model"]) is None
    assert weights_fingerprint([str(tmp_path / "config-only")]) is None
    # A local LLM beside a hub tower: fingerprinted by the local files and the hub's name.
    mixed = weights_fingerprint([str(folder), "org/hub-tower"])
    assert mixed is not None and mixed != weights_fingerprint([str(folder)])
    (folder / "model.safetensors").write_bytes(b"retrained")
    assert weights_fingerprint([str(folder), "org/hub-tower"]) != mixed


def test_base_fingerprint_covers_what_the_base_is_built_from(tmp_path):
    llm, vit = _model_folder(tmp_path / "llm", b"l"), _model_folder(tmp_path / "vit", b"v")
    projector = tmp_path / "projector.safetensors"
    projector.write_bytes(b"p")
    parts = PartsBase(llm=str(llm), vision_tower=str(vit))
    with_projector = parts.model_copy(update={"pretrained_projector": str(projector)})
    assert base_fingerprint(parts) == weights_fingerprint([str(llm), str(vit)])
    assert base_fingerprint(with_projector) == weights_fingerprint(
        [str(llm), str(vit), str(projector)])
    swapped = PartsBase(llm=str(vit), vision_tower=str(llm))  # order is part of it
    assert base_fingerprint(swapped) != base_fingerprint(parts)
    assert base_fingerprint(parts.model_copy(update={"random_init": True})) is None
    assert base_fingerprint(CheckpointBase(path=str(llm))) == weights_fingerprint([str(llm)])
    assert base_fingerprint(CheckpointBase(path="base")) is None  # relative to another run
    assert base_fingerprint(MergedBase(adapter="/a", base=parts)) is None


def test_a_fingerprint_is_written_and_read_back(tmp_path):
    base = CheckpointBase(path="/m/llava", fingerprint="sha256:" + "0" * 64)
    RunManifest(kind=OutputKind.LORA, base=base, template="v1", tokenization="hf",
                image_aspect_ratio="pad").write(tmp_path)
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["base"]["fingerprint"] == (
        base.fingerprint)
    assert read_manifest(tmp_path).base == base

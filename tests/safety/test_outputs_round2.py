"""What the commands write, second round (issues 23 and 25): no command writes over its own
inputs (an output file too, through links, whatever --overwrite says), every output is
readable by others under umask 022, merged and converted configs carry no custom-code
references, a damaged weight file is named, and each command's bad input is one line, exit 2,
through the one command boundary."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import tree_digest
from tests.safety.conftest import IMAGES, RECORDS

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"
FOREIGN = {"AutoModelForCausalLM": "foreign_code.Model"}


def _train(stage: str, model: Path, out: Path, *extra: str) -> list[str]:
    return [stage, "--model-name-or-path", str(model), "--data-path", RECORDS,
            "--image-folder", IMAGES, "-o", str(out), "--batch-size", "2", "--seed", "7",
            "--max-steps", "1", "--dataloader-num-workers", "0", *extra]


def _ok(args: list[str]) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def _one_line(result, command: str, code: int = 2) -> str:
    """The command failed with exit `code` and one `llava COMMAND: …` line, no traceback."""
    assert result.exit_code == code, result.output
    assert TRACEBACK not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llava {command}: "), result.stderr
    return lines[0]


def _with_auto_map(folder: Path) -> Path:
    """`folder` whose config.json refers to custom code, as a foreign checkpoint may."""
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = FOREIGN
    config["text_config"]["auto_map"] = FOREIGN
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def written(llava_checkpoint, assets, tmp_path_factory) -> dict[str, Path]:
    """Every kind of output, written under umask 022: a finetune run (with checkpoint-1 and a
    vision feature cache), a LoRA run (with checkpoint-1) on a base whose config refers to
    custom code, its merge, exported projectors, and an original checkpoint converted."""
    root = tmp_path_factory.mktemp("written")
    previous = os.umask(0o022)
    try:
        base = _with_auto_map(Path(shutil.copytree(llava_checkpoint, root / "base")))
        _ok(_train("finetune", llava_checkpoint, root / "finetune", "--save-steps", "1",
                   "--vision-feature-cache", str(root / "cache")))
        _ok(_train("lora", base, root / "lora", "--save-steps", "1", "--lora-r", "4",
                   "--lora-alpha", "8"))
        _ok(["merge-lora", root / "lora", "-o", root / "merged"])
        _ok(["export-projector", root / "finetune", "-o", root / "exported" / "p.safetensors"])
        _ok(["export-projector", root / "finetune", "-o", root / "exported" / "p.bin"])
        original = assets / "original-llava"
        full = _with_auto_map_original(Path(shutil.copytree(original / "full", root / "orig")))
        _ok(["convert", full, "-o", root / "converted", "--vision-tower",
             original / "tiny-clip"])
    finally:
        os.umask(previous)
    return {name: root / name for name in ("base", "finetune", "lora", "merged", "exported",
                                           "cache", "converted", "orig")}


def _with_auto_map_original(folder: Path) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = FOREIGN
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root.parent)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in [root, *sorted(root.rglob("*"))]}


@pytest.mark.parametrize("name", ["finetune", "lora", "merged", "exported", "cache",
                                  "converted"])
def test_every_output_is_readable_by_others_under_umask_022(written, name):
    modes = _modes(written[name])
    files = {path: mode for path, mode in modes.items() if (written[name].parent / path).is_file()}
    folders = {path: mode for path, mode in modes.items() if path not in files}
    assert files and set(files.values()) == {"0o644"}, files
    assert set(folders.values()) == {"0o755"}, folders
    if name in ("finetune", "lora"):  # the checkpoint's weights, optimizer and state too
        assert any("checkpoint-1/" in path for path in files)
        assert any(path.endswith((".safetensors",)) for path in files)
    if name == "cache":
        assert any(path.endswith(".safetensors") for path in files)


@pytest.mark.parametrize("name", ["merged", "converted"])
def test_merged_and_converted_configs_refer_to_no_custom_code(written, name):
    text = (written[name] / "config.json").read_text()
    assert "auto_map" not in text and "foreign_code" not in text
    source = written["base" if name == "merged" else "orig"] / "config.json"
    assert "foreign_code" in source.read_text()  # the input is left as it was


@pytest.mark.parametrize("how", ["into the model", "over its weights", "through a link",
                                 "given through a link"])
def test_export_projector_never_writes_over_its_input(llava_checkpoint, tmp_path, how):
    model = Path(shutil.copytree(llava_checkpoint, tmp_path / "model"))
    (tmp_path / "alias").symlink_to(model)
    (tmp_path / "weights.safetensors").symlink_to(model / "model.safetensors")
    source, target = {
        "into the model": (model, model / "mm_projector.bin"),
        "over its weights": (model, model / "model.safetensors"),
        "through a link": (model, tmp_path / "weights.safetensors"),
        "given through a link": (tmp_path / "alias", model / "model.safetensors")}[how]
    before, names = tree_digest(model), sorted(p.name for p in model.iterdir())
    result = runner.invoke(app, ["export-projector", str(source), "-o", str(target),
                                 "--overwrite"])
    if how == "into the model":  # a new file beside the weights: LLaVA's mm_projector.bin
        assert result.exit_code == 0, result.output
        assert {k: v for k, v in tree_digest(model).items() if k != "mm_projector.bin"} == before
        return
    line = _one_line(result, "export-projector")
    assert "is the checkpoint file model.safetensors" in line
    assert "apart from every input" in line
    assert tree_digest(model) == before
    assert sorted(p.name for p in model.iterdir()) == names


def test_export_projector_never_writes_over_a_projector_file_it_reads(written, tmp_path):
    exported = written["exported"] / "p.bin"
    before = exported.read_bytes()
    result = runner.invoke(app, ["export-projector", str(exported), "-o", str(exported),
                                 "--overwrite"])
    assert "is the checkpoint" in _one_line(result, "export-projector")
    assert exported.read_bytes() == before


def test_a_feature_cache_inside_an_input_is_refused(llava_checkpoint, tmp_path):
    from llava_cli.config.resolve import resolve_config
    from llava_cli.train.run import run_training

    before = tree_digest(llava_checkpoint)
    cache = llava_checkpoint / "features"
    result = runner.invoke(app, _train("finetune", llava_checkpoint, tmp_path / "out",
                                       "--vision-feature-cache", str(cache)))
    line = _one_line(result, "finetune")
    assert f"vision feature cache {str(cache)!r} lies inside the model" in line
    config = resolve_config("finetune", flags={
        "model_name_or_path": str(llava_checkpoint), "data_path": RECORDS,
        "image_folder": IMAGES, "output_dir": str(tmp_path / "out"),
        "vision_feature_cache": IMAGES})  # the image folder, which holds the records
    with pytest.raises(ValueError, match=r"vision feature cache .* contains the data \(--data"):
        run_training(config)
    assert tree_digest(llava_checkpoint) == before and not cache.exists()
    assert not (tmp_path / "out").exists()


def test_a_truncated_weight_file_is_named(llava_checkpoint, tmp_path):
    model = Path(shutil.copytree(llava_checkpoint, tmp_path / "model"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    result = runner.invoke(app, ["convert", str(model), "--to", "llava", "-o",
                                 str(tmp_path / "llava-out")])
    line = _one_line(result, "convert")
    assert f"{str(weights)!r} is damaged or truncated" in line
    assert not (tmp_path / "llava-out").exists()


@pytest.mark.parametrize(("args", "command", "message"), [
    (["export-projector", "{tmp}/none", "-o", "{tmp}/p.bin"], "export-projector", "none"),
    (["demo", "-o", "{tmp}/a-file"], "demo", "is a file"),
    (["inspect-data", "--demo", "--index", "9999"], "inspect-data", "--index 9999: record out"),
    (["recipe-from-script", "{tmp}/none.sh"], "recipe-from-script", "cannot read"),
    (["recipe-from-script", "{tmp}/binary.sh"], "recipe-from-script", "cannot read"),
    (["merge-lora", "{tmp}", "-o", "{tmp}/merged"], "merge-lora", "llava_run.json"),
    (["convert", "{tmp}", "-o", "{tmp}/out", "--to", "bogus"], "convert", "--to 'bogus'"),
])
def test_bad_input_is_one_line_exit_2_for_every_command(tmp_path, args, command, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "binary.sh").write_bytes(bytes(range(256)))
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert message in _one_line(result, command)


def test_a_failed_verification_exits_1_through_the_boundary():
    from llava_cli.commands.boundary import guarded
    from llava_cli.convert.original_forward import ConversionError

    def command() -> None:
        raise ConversionError("converted model failed verification; nothing was written: x")

    probe = typer.Typer()
    probe.command("probe")(guarded("probe", command))
    probe.command("other")(lambda: None)
    line = _one_line(runner.invoke(probe, ["probe"]), "probe", code=1)
    assert line == ("llava probe: converted model failed verification; nothing was "
                    "written: x")

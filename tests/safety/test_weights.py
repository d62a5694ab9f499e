"""Weights that are not there are an error, never random weights; a merge refuses a base that
changed since its run was trained. Through the real command line: a one-line error naming the
folder, the component and the key, no traceback, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import PLAIN_SCHEDULE, TINY_LLM, TINY_VISION, demo_sample, tree_digest

RECORDS, IMAGES = demo_sample()

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"
WEIGHTS = "model.safetensors"


def _train(stage: str, model: Path | str, out: Path, *extra: str) -> list[str]:
    return [stage, "--model-name-or-path", str(model), "--data-path", RECORDS,
            "--image-folder", IMAGES, "-o", str(out), "--batch-size", "2", "--seed", "7",
            "--max-steps", "1", "--dataloader-num-workers", "0",
            *(f"--{k.replace('_', '-')}={v}" for k, v in PLAIN_SCHEDULE.items()), *extra]


def _one_line_error(result, command: str) -> str:
    """The command failed with one `llava COMMAND: …` line and no traceback; returns it."""
    assert result.exit_code != 0, result.output
    assert TRACEBACK not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("llava ")]
    assert len(lines) == 1 and lines[0].startswith(f"llava {command}: "), result.stderr
    return lines[0]


def _copy(checkpoint: Path, where: Path) -> Path:
    return Path(shutil.copytree(checkpoint, where))


def _drop_key(folder: Path, key: str) -> None:
    """Rewrite the weight file without one tensor (as a truncated conversion would leave it)."""
    state = load_file(folder / WEIGHTS)
    del state[key]
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def _nothing_written(out: Path) -> None:
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_finetune_from_a_checkpoint_without_its_weight_file(llava_checkpoint, tmp_path):
    damaged = _copy(llava_checkpoint, tmp_path / "damaged")
    (damaged / WEIGHTS).unlink()  # config.json, processor and manifest stay
    result = runner.invoke(app, _train("finetune", damaged, tmp_path / "out"))
    assert result.exit_code == 2
    line = _one_line_error(result, "finetune")
    assert f"LLaVA model '{damaged}': its weights could not be loaded" in line
    assert "restore its weight files" in line and "random_init" not in line
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize(("key", "named"), [
    ("language_model.model.layers.0.self_attn.q_proj.weight",
     "LLM: 1 missing (model.language_model.layers.0.self_attn.q_proj.weight)"),
    ("vision_tower.encoder.layers.0.mlp.fc1.weight",
     "vision tower: 1 missing (model.vision_tower.encoder.layers.0.mlp.fc1.weight)"),
    ("multi_modal_projector.linear_1.weight",
     "projector: 1 missing (model.multi_modal_projector.linear_1.weight)"),
])
def test_finetune_from_a_checkpoint_missing_a_key(llava_checkpoint, tmp_path, key, named):
    damaged = _copy(llava_checkpoint, tmp_path / "damaged")
    _drop_key(damaged, key)
    result = runner.invoke(app, _train("finetune", damaged, tmp_path / "out"))
    assert result.exit_code == 2
    line = _one_line_error(result, "finetune")
    assert f"'{damaged}'" in line and named in line and "random weights" in line
    _nothing_written(tmp_path / "out")


def test_generate_from_a_checkpoint_missing_a_key(llava_checkpoint, tmp_path):
    damaged = _copy(llava_checkpoint, tmp_path / "damaged")
    _drop_key(damaged, "language_model.lm_head.weight")
    result = runner.invoke(app, ["generate", str(damaged), "--prompt", "What is it?"])
    line = _one_line_error(result, "generate")
    assert f"'{damaged}'" in line and "LLM: 1 missing (lm_head.weight)" in line
    (damaged / WEIGHTS).unlink()
    line = _one_line_error(runner.invoke(app, ["generate", str(damaged), "--prompt", "Hi"]),
                           "generate")
    assert "its weights could not be loaded" in line


def test_a_new_model_from_parts_without_weights_says_how(tmp_path):
    """The tiny recipes' LLM and vision folders hold a config.json only."""
    result = runner.invoke(app, _train("finetune", TINY_LLM, tmp_path / "out", "--vision-tower",
                                       str(TINY_VISION), "--tokenizer", "demo"))
    assert result.exit_code == 2
    line = _one_line_error(result, "finetune")
    assert f"LLM '{TINY_LLM}': its weights could not be loaded" in line
    assert "random_init: true" in line
    _nothing_written(tmp_path / "out")


def test_a_merge_into_a_base_overwritten_since_training_is_refused(llava_checkpoint, tmp_path):
    """The issue's sequence: `merge-lora -o BASE --overwrite` (allowed) makes BASE the merged
    model; merging the same run again would apply its delta twice, and said 'verified'."""
    base = _copy(llava_checkpoint, tmp_path / "base")
    run = tmp_path / "lora"
    trained = runner.invoke(app, _train("lora", base, run, "--lora-r", "4", "--lora-alpha", "8"))
    assert trained.exit_code == 0, trained.output
    recorded = json.loads((run / "llava_run.json").read_text())["base"]
    assert recorded["path"] == str(base.resolve()) and recorded["fingerprint"]
    first = runner.invoke(app, ["merge-lora", str(run), "-o", str(base), "--overwrite"])
    assert first.exit_code == 0, first.output
    assert "verified" in first.output
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_digest(out)
    for extra in ([], ["--base", str(base)]):
        again = runner.invoke(app, ["merge-lora", str(run), "-o", str(out), "--overwrite",
                                    *extra])
        assert again.exit_code == 2
        line = _one_line_error(again, "merge-lora")
        assert str(base.resolve()) in line and "weight files differ from the fingerprint" in line
        assert "pass the original base with --base, or re-train" in line
        assert tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging left

"""Bad inputs that used to end in a traceback: each is now one named line at the command
boundary, and the inputs are left as they were."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import TINY_LLM, TINY_VISION, demo_sample, tree_digest

RECORDS, IMAGES = demo_sample()

runner = CliRunner()
TRACEBACK = "Traceback (most recent call last)"


def _one_line(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert TRACEBACK not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("llava ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _finetune(model, out, *extra):
    return runner.invoke(app, ["finetune", "--model-name-or-path", str(model), "--data-path",
                               RECORDS, "--image-folder", IMAGES, "-o", str(out),
                               "--max-steps", "1", "--dataloader-num-workers", "0", *extra])


def test_a_plain_folder_as_model_path(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a model")
    message = _one_line(_finetune(tmp_path / "plain", tmp_path / "out",
                                  "--vision-tower", str(TINY_VISION)))
    assert "plain" in message
    assert not (tmp_path / "out").exists()


def test_an_llm_given_as_vision_tower(tmp_path):
    message = _one_line(_finetune(TINY_LLM, tmp_path / "out", "--vision-tower", str(TINY_LLM),
                                  "--random-init", "--tokenizer", "demo"))
    assert "vision" in message
    assert not (tmp_path / "out").exists()


def test_a_vision_select_layer_the_tower_does_not_have(tmp_path):
    message = _one_line(_finetune(TINY_LLM, tmp_path / "out", "--vision-tower",
                                  str(TINY_VISION), "--random-init", "--tokenizer", "demo",
                                  "--vision-select-layer", "99"))
    assert "vision_select_layer 99" in message


def test_a_projector_file_that_is_not_a_dict(tmp_path, llava_checkpoint):
    projector = tmp_path / "mm_projector.bin"
    torch.save([1, 2, 3], projector)
    message = _one_line(_finetune(llava_checkpoint, tmp_path / "out", "--pretrained-projector",
                                  str(projector)))
    assert "mm_projector.bin" in message


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_safetensors_file(tmp_path, llava_checkpoint, keep):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(llava_checkpoint, damaged)
    weights = damaged / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    before = tree_digest(damaged)
    message = _one_line(_finetune(damaged, tmp_path / "out"))
    assert "model.safetensors" in message or "damaged" in message, message
    assert tree_digest(damaged) == before
    generated = runner.invoke(app, ["generate", str(damaged), "--prompt", "hi"])
    assert generated.exit_code in (1, 2) and TRACEBACK not in generated.output

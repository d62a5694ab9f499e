"""Folders we are given never make us run their code: a checkpoint that ships a Python file
and points its model, config, tokenizer and processor at it (`auto_map`), plus a saved
configuration claiming `trust_remote_code: true`, is read by every command without executing
it; only the user's own `--trust-remote-code` (where a command has it) would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import demo_sample, tree_digest

RECORDS, IMAGES = demo_sample()

runner = CliRunner()


@pytest.fixture()
def payload(llava_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A copy of a real checkpoint armed everywhere transformers looks for remote code; the
    marker file appears if any of it runs."""
    folder = tmp_path / "payload"
    shutil.copytree(llava_checkpoint, folder)
    marker = tmp_path / "executed"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilConfig(LlavaConfig):\n    pass\n\n\n"
        "class EvilModel(LlavaForConditionalGeneration):\n    config_class = EvilConfig\n\n\n"
        "class EvilProcessor(LlavaProcessor):\n    pass\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    _add_auto_map(folder / "config.json", {
        "AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel",
        "AutoModelForCausalLM": "evil.EvilModel"})
    _add_auto_map(folder / "processor_config.json", {"AutoProcessor": "evil.EvilProcessor"})
    _add_auto_map(folder / "tokenizer_config.json",
                  {"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    saved = yaml.safe_load((folder / "llava_config.yaml").read_text())
    (folder / "llava_config.yaml").write_text(yaml.safe_dump({**saved,
                                                              "trust_remote_code": True}))
    return folder, marker


def _add_auto_map(file: Path, auto_map: dict) -> None:
    data = json.loads(file.read_text())
    data["auto_map"] = auto_map
    file.write_text(json.dumps(data))


@pytest.mark.parametrize("command", ["finetune", "generate", "inspect-data",
                                     "export-projector"])
def test_no_command_runs_code_from_a_folder_it_is_given(payload, tmp_path, command):
    folder, marker = payload
    before = tree_digest(folder)
    args = {
        "finetune": ["finetune", "--model-name-or-path", str(folder), "--data-path", RECORDS,
                     "--image-folder", IMAGES, "-o", str(tmp_path / "out"), "--max-steps",
                     "1", "--dataloader-num-workers", "0"],
        "generate": ["generate", str(folder), "--prompt", "What is it?"],
        "inspect-data": ["inspect-data", RECORDS, "--image-folder", IMAGES, "--model",
                         str(folder), "--check"],
        "export-projector": ["export-projector", str(folder), "-o",
                             str(tmp_path / "p.safetensors")],
    }[command]
    result = runner.invoke(app, args)
    assert not marker.exists(), f"{command} ran code shipped in the folder it was given"
    assert "Traceback (most recent call last)" not in result.output
    assert tree_digest(folder) == before


def test_the_payload_is_real_when_remote_code_is_allowed(payload):
    from transformers import AutoConfig

    folder, marker = payload
    AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    assert marker.exists()

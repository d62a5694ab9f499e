"""Dependencies and start-up: deepspeed is a real dependency, the version floors are what
transformers itself needs, a missing reporter package is one line, and a run prints our
output only (no tqdm bars, no DeepSpeed accelerator guess)."""

from __future__ import annotations

import os
import subprocess
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.inspect.inspection import demo_data
from tests.helpers import ROOT, TINY_LLM, TINY_VISION


def _floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for line in project["dependencies"]:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                floors[requirement.name] = Version(spec.version)
    return floors


def test_version_floors_are_what_transformers_needs_and_deepspeed_is_a_dependency():
    from transformers.utils import import_utils

    floors = _floors()
    assert floors["torch"] >= Version("2.6")  # transformers disables torch below 2.6
    assert floors["accelerate"] >= Version(import_utils.ACCELERATE_MIN_VERSION)
    assert floors["bitsandbytes"] >= Version(import_utils.BITSANDBYTES_MIN_VERSION)
    assert {"peft", "deepspeed"} <= set(floors)


def test_a_missing_reporter_package_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["finetune", "--report-to", "wandb", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "report_to wandb needs the wandb package: pip install wandb" in result.stderr
    assert "Traceback" not in result.output


def test_a_run_prints_only_our_output(tmp_path):
    records, images = demo_data()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DS_ACCELERATOR", None)
    done = subprocess.run(
        [sys.executable, "-m", "llava_cli", "finetune", "--model-name-or-path", str(TINY_LLM),
         "--vision-tower", str(TINY_VISION), "--tokenizer", "demo", "--random-init",
         "--data-path", records, "--image-folder", images, "--max-steps", "1",
         "--dataloader-num-workers", "0", "-o", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    shown = done.stdout + done.stderr
    for noise in ("Loading weights", "Writing model shards", "it/s]", "real_accelerator"):
        assert noise not in shown, noise
    assert "llava training run" in shown and "done:" in shown

"""The built wheel, as a user installs it: into a clean virtual environment (torch first), then
`llava demo --quick` from a folder that is not the repository. Catches what an editable install
hides (package data such as the demo's recipes, the sample records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(command)}:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-3000:]}")
    return done


def test_the_wheel_installs_and_runs_the_quick_demo_from_another_folder(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
         cwd=tmp_path)
    (wheel,) = dist.glob("llava_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("llava_cli/demo/recipes/pretrain.yaml",
                    "llava_cli/demo/recipes/llm/config.json",
                    "llava_cli/assets/sample/records.json"):
        assert shipped in names, f"{shipped} is not in the wheel"
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    _run([*pip, "torch==2.13.0"], cwd=tmp_path)  # first: a bare torch would pull CUDA builds
    _run([*pip, str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run([str(venv / "bin" / "llava"), "demo", "--quick", "--output-dir", "out"], cwd=elsewhere)
    result = json.loads((elsewhere / "out" / "eval.json").read_text())
    assert result["mode"] == "quick" and result["accuracy"]["finetune"]["color"] >= 0.5
    assert (elsewhere / "out" / "merged" / "model.safetensors").is_file()

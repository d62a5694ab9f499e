"""What a user reads on the console of a run: the summary of a resumed run names the
checkpoint it continues (and its step), and dpo's loss lines show the reward margin and
accuracy beside the loss."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from llava_cli.config.resolve import resolve_config
from llava_cli.demo.shapes import generate_split
from llava_cli.train.reporting import Reporter
from llava_cli.train.run import run_training
from tests.helpers import tiny_finetune_output


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("console")
    return {"root": root, "model": tiny_finetune_output(root),
            "data": generate_split(root / "dpo", 4, 0, "dpo")}


def _run(base: dict[str, Path], out: Path, **keys) -> str:
    flags = {"model_name_or_path": str(base["model"]), "data_path": str(base["data"]),
             "image_folder": str(base["data"].parent), "output_dir": str(out),
             "train_llm": "lora", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
             "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
             "save_steps": 1, "seed": 3, "dataloader_num_workers": 0, **keys}
    text = io.StringIO()
    run_training(resolve_config("dpo", flags=flags),
                 Reporter(Console(file=text, width=300, force_terminal=False)))
    return text.getvalue()


def test_dpo_lines_show_rewards_and_a_resumed_run_names_its_checkpoint(base) -> None:
    first = base["root"] / "first"
    printed = _run(base, first, max_steps=2)
    steps = [line for line in printed.splitlines() if re.match(r"step \d+: loss", line)]
    assert len(steps) == 2, printed
    for line in steps:
        assert re.search(r"rewards/margins -?\d", line) and "rewards/accuracies" in line, line
    assert "resumed from" not in printed
    again = base["root"] / "again"
    shutil.copytree(first / "checkpoint-1", again / "checkpoint-1")
    printed = _run(base, again, max_steps=2, resume="latest")
    row = next(line for line in printed.splitlines() if "resumed from" in line)
    assert f"{again / 'checkpoint-1'} (step 1, --resume latest)" in row, row
    state = json.loads((again / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2

"""`llava convert --to llava` on a model of the built-in demo tokenizer (as `llava demo`
trains): one line that says why the original layout cannot hold it, and what to do."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from llava_cli.cli import app
from tests.helpers import tiny_finetune_output


def test_a_demo_tokenizer_model_is_refused_saying_why(tmp_path: Path) -> None:
    model = tiny_finetune_output(tmp_path / "runs")
    out = tmp_path / "llava-demo"
    result = CliRunner().invoke(app, ["convert", str(model), "--to", "llava", "--output-dir",
                                      str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not out.exists()
    message = " ".join(result.stderr.split())
    assert "the tokens <image>/<pad> are not the model's last embedding rows (ids [" in message
    assert ("the original LLaVA adds its image token after the LLM's vocabulary and keeps only "
            "the rows before it") in message
    assert "(as the built-in demo tokenizer of `llava demo` does)" in message
    assert "convert a model trained from an LLM with its own tokenizer" in message


def test_a_lora_run_on_a_whole_llava_checkpoint_is_refused_precisely(tmp_path: Path) -> None:
    from llava_cli.config.resolve import resolve_config
    from llava_cli.demo.shapes import generate_split
    from llava_cli.train.run import run_training

    model = tiny_finetune_output(tmp_path / "runs")
    data = generate_split(tmp_path / "lora-data", 4, 0, "finetune")
    run = run_training(resolve_config("lora", flags={
        "model_name_or_path": str(model), "data_path": str(data),
        "image_folder": str(data.parent), "output_dir": str(tmp_path / "lora"),
        "lora_r": 4, "lora_alpha": 8, "max_steps": 1, "per_device_train_batch_size": 2,
        "save_steps": 100, "dataloader_num_workers": 0})).output_dir
    result = CliRunner().invoke(app, ["convert", str(run), "--to", "llava", "--output-dir",
                                      str(tmp_path / "llava-lora")])
    assert result.exit_code == 2, result.output
    message = " ".join(result.stderr.split())
    assert "is a whole LLaVA checkpoint, not a plain LLM; the original serves such a LoRA " \
        "run with --model-base naming it in the original layout (`llava convert" in message
    assert "(as finetune_task_lora.sh runs are served), a layout `convert --to llava` does " \
        "not write yet." in message
    assert f"Merge it (`llava merge-lora {run} -o MERGED`) and convert the merged output" \
        in message
    assert not (tmp_path / "llava-lora").exists()

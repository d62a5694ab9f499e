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

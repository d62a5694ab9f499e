"""The `llava` command line, run through Typer's CliRunner and real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image
from typer.testing import CliRunner

from llava_cli.cli import app

runner = CliRunner()
COMMANDS = ["pretrain", "finetune", "lora", "merge-lora", "inspect-data", "export-projector"]


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from llava_cli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.output); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "NO-TORCH" in out
    for command in COMMANDS:
        assert command in out


def test_module_entry_point_strips_deepspeed_local_rank():
    out = subprocess.run([sys.executable, "-m", "llava_cli", "--local_rank=0", "--version"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("llava ")


def test_training_without_output_dir_is_a_clear_error():
    result = runner.invoke(app, ["finetune"])
    assert result.exit_code == 2
    assert "output_dir is required (--output-dir DIR)" in result.output


def test_print_config_shows_resolved_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("template: chatml\nlearning_rate: 1.0e-3\n")
    result = runner.invoke(app, ["finetune", str(recipe), "--set", "learning_rate=5e-5",
                                 "--lr", "1e-4", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "template: chatml" in result.output
    assert "learning_rate: 0.0001" in result.output


def test_config_error_exit_code(tmp_path):
    result = runner.invoke(app, ["pretrain", "--set", "tempalte=v1", "--print-config"])
    assert result.exit_code == 2
    assert "did you mean 'template'?" in result.output


def test_inspect_demo_rich_view():
    result = runner.invoke(app, ["inspect-data", "--demo", "--limit", "5"])
    assert result.exit_code == 0, result.output
    assert "record 'shape-001'" in result.output and "<image ×64>" in result.output
    assert "added <image> at the start of the first human turn" in result.output
    assert "record 'pair-001'" in result.output


def test_inspect_show_ids():
    result = runner.invoke(app, ["inspect-data", "--demo", "--index", "0", "--show-ids"])
    assert result.exit_code == 0, result.output
    assert "-100" in result.output and "<image ×64>" in result.output


def test_inspect_jsonl_contract():
    result = runner.invoke(app, ["inspect-data", "--demo", "--format", "jsonl",
                                 "--template", "plain", "--id", "shape-003"])
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.output.splitlines()]
    assert line["id"] == "shape-003" and len(line["input_ids"]) == len(line["labels"])
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    caption = tokenizer("a green triangle on a black background\n",
                        add_special_tokens=False).input_ids
    assert line["input_ids"] == [tokenizer.bos_token_id] + [image_id] * 64 + caption
    assert line["labels"] == [-100] * 65 + caption


def _bad_dataset(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    records = [
        {"id": "good", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "corrupt", "image": "broken.jpg", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "roles", "conversations": [
            {"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "two-images", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "long", "image": "ok.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "word " * 200},
            {"from": "gpt", "value": "red"}]},
        {"id": "text", "conversations": [
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return data


def test_check_reports_every_problem_and_fails(tmp_path):
    data = _bad_dataset(tmp_path)
    result = runner.invoke(app, ["inspect-data", str(data), "--demo", "--check", "--format",
                                 "json", "--model-max-length", "120", "--workers", "1",
                                 "--image-folder", str(tmp_path)])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["records"] == 7 and report["text_only_records"] == 2
    assert report["problems"] == {"bad-image": 2, "role-error": 1, "image-token-mismatch": 1,
                                  "fully-masked": 1}
    assert report["examples"]["bad-image"] == ["missing", "corrupt"]
    assert report["examples"]["fully-masked"] == ["long"]
    assert "nope.png" in report["first_messages"]["bad-image"]
    assert report["ok"] is False


def test_check_counts_images_under_either_key(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "ok.png")
    turns = [{"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "yes"}]
    records = [{"id": "a", "images": ["ok.png", "ok.png"], "conversations": turns},
               {"id": "b", "image": ["ok.png", "ok.png"], "conversations": turns}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = runner.invoke(app, ["inspect-data", str(data), "--demo", "--check", "--format",
                                 "json", "--workers", "1", "--image-folder", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert (report["image_records"], report["multi_image_records"]) == (2, 2)
    assert report["text_only_records"] == 0


def test_check_rich_report_uses_two_processes(tmp_path):
    data = _bad_dataset(tmp_path)
    # Many copies so the scan is split into slices across both worker processes.
    lines = data.read_text().splitlines() * 400
    data.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["inspect-data", str(data), "--demo", "--check",
                                 "--workers", "2", "--image-folder", str(tmp_path)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "bad-image" in result.output
    assert "2800" in result.output and "2000 / 800 / 0" in result.output


def test_missing_data_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["inspect-data", str(tmp_path / "x.json"), "--tokenizer", "demo"])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_conflicting_trainability_switches_are_a_clear_error():
    result = runner.invoke(app, ["finetune", "--lora", "--freeze-llm", "--print-config"])
    assert result.exit_code == 2
    assert "drop --freeze-llm" in result.output

"""`llava pretrain|finetune|lora` with the original command line through `cli.main`, and
`llava recipe-from-script`."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from llava_cli.cli import app, main
from tests.test_original_scripts import (
    SCRIPTS,
    _deepspeed_configs,
    original_arguments,
    run_main,
)

runner = CliRunner()


def test_help_and_our_kebab_flags_are_unaffected(capsys):
    code, out, _ = run_main(["finetune", "--help"], capsys)
    assert code == 0 and "--model-name-or-path" in out
    code, out, _ = run_main(["finetune", "--model-name-or-path", "m", "--no-bf16",
                             "--batch-size", "3", "--print-config"], capsys)
    assert code == 0
    assert "model_name_or_path: m" in out and "per_device_train_batch_size: 3" in out


def test_unknown_original_arguments_are_one_error_naming_all(capsys):
    code, _, err = run_main(["finetune", "--per_device_train_batch_sise", "2", "--bf16", "True",
                             "--frobnicate", "1", "--print-config"], capsys)
    assert code == 2
    assert err.count("\n") == 1, err
    assert ("unknown configuration keys 'per_device_train_batch_sise' (did you mean "
            "'per_device_train_batch_size'?), 'frobnicate'") in err


def test_the_launchers_local_rank_and_other_commands_pass_through(capsys):
    code, out, _ = run_main(["--local_rank=0", "finetune", "--version", "v0", "--local_rank",
                             "1", "--print-config"], capsys)
    assert code == 0 and "template: v1" in out  # LLaVA's --version v0 trains vicuna_v1
    with pytest.raises(SystemExit) as done:
        main(["llava", "--version"])
    assert done.value.code in (0, None)


@pytest.mark.parametrize(("name", "stage"), [("llava_v1_5_pretrain", "pretrain"),
                                             ("llava_v1_5_finetune", "finetune"),
                                             ("llava_v1_5_finetune_lora", "lora")])
def test_recipe_from_script_prints_a_recipe_that_resolves_like_the_arguments(
        name, stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _deepspeed_configs(tmp_path / "scripts")
    result = runner.invoke(app, ["recipe-from-script", str(SCRIPTS / f"{name}.sh")])
    assert result.exit_code == 0, result.output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(result.stdout)
    assert f"# Run: llava {stage} THIS.yaml" in result.stdout
    assert "# --lazy_preprocess True: accepted, no effect" in result.stdout
    from_recipe = runner.invoke(app, [stage, str(recipe), "--set", "report_to=none",
                                      "--print-config"])
    assert from_recipe.exit_code == 0, from_recipe.output
    code, from_args, _ = run_main(
        [stage, *original_arguments(name), "--report_to", "none", "--print-config"], capsys)
    assert code == 0
    # The same configuration and trainer arguments (in another order: --deepspeed and --bf16
    # are named flags of ours, the last layer)
    assert yaml.safe_load(from_recipe.stdout) == yaml.safe_load(from_args)


def test_recipe_from_script_keeps_shell_variables_with_a_warning():
    result = runner.invoke(app, ["recipe-from-script", str(SCRIPTS / "llava_finetune_qlora.sh")])
    assert result.exit_code == 0, result.output
    assert "version: $PROMPT_VERSION" in result.stdout  # under its own (valid) name
    assert "'./checkpoints/$MODEL_VERSION' is a shell variable, kept as written" in result.stderr
    assert "bits: 4" in result.stdout and "# Run: llava lora THIS.yaml" in result.stdout


def test_recipe_from_script_errors(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text("echo hello\n")
    result = runner.invoke(app, ["recipe-from-script", str(script)])
    assert result.exit_code == 2 and "no training command found" in result.stderr
    script.write_text("torchrun --nproc_per_node 8 llava/train/train.py \\\n  --bogus_arg 1 \\\n"
                      "  --other_bogus 2 | tee log\n")
    result = runner.invoke(app, ["recipe-from-script", str(script)])
    assert result.exit_code == 2
    assert "unknown configuration keys 'bogus_arg', 'other_bogus'" in result.stderr


def test_recipe_from_script_refuses_what_the_command_line_refuses(tmp_path):
    script = tmp_path / "x.sh"
    script.write_text("deepspeed llava/train/train_mem.py --version v1 \\\n"
                      "  --mm_patch_merge_type spatial_unpad --lazy_preprocess True\n")
    result = runner.invoke(app, ["recipe-from-script", str(script)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "mm_patch_merge_type 'spatial_unpad': only 'flat'" in result.stderr

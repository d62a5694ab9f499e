"""The one declaration of settings, seen from outside: every training command's `--help`
shows, for each option, the default that command really applies (read back from the resolved
configuration and the Trainer's arguments), names are whole at 80 columns, dpo's options are
dpo's alone, the stage defaults are LLaVA-1.5's scripts, and docs/settings.md is current."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.config.declared import declared_settings, format_value, settings_reference
from llava_cli.config.resolve import resolve_config
from llava_cli.config.setting import STAGES
from llava_cli.config.trainer_fields import NO_DEFAULT, TrainerField, _from_import, trainer_fields
from llava_cli.train.arguments import argument_values
from tests.helpers import ROOT

OPTION = re.compile(r"^  (-[-\w]+)")


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"},
                                terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _shown_defaults(text: str) -> dict[str, str]:
    """Option's first name → the text of its `[default: …]`, wrapped lines joined."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = OPTION.match(line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("   "):  # a wrapped line (a hyphen breaks too)
            joint = "" if blocks[current].endswith("-") else " "
            blocks[current] += joint + line.strip()
        else:
            current = None
    out = {}
    for block in blocks.values():
        found = re.search(r"\[default: ([^\]]*)\]", " ".join(block.split()))
        names = re.findall(r"(?<![\w-])(--?[a-z][-\w]*)", block.split("  ")[1])
        for name in names if found else ():
            out[name] = found.group(1)
    return out


@pytest.mark.parametrize("command", STAGES)
def test_every_option_shows_the_default_its_command_applies(command):
    text = _help(command)
    shown = _shown_defaults(text)
    config = resolve_config(command)
    trainer = argument_values(config, "out", on_cpu=True, workers=1)
    checked = 0
    for setting in declared_settings():
        if not setting.setting.flag or command not in setting.setting.commands:
            continue
        name = setting.option_names[0]
        assert name in shown, f"{command} --help shows no default for {name}"
        if setting.trainer:
            # not set by us: TrainingArguments' own default (the real class's: see below)
            applied = trainer.get(setting.name, trainer_fields()[setting.name].default)
            if setting.name == "gradient_checkpointing":
                applied = trainer["activation_checkpointing"]
            if setting.name == "dataloader_num_workers":  # computed for the machine
                assert shown[name] == setting.setting.default_text
                continue
        else:
            applied = getattr(config, setting.name)
        if applied is None:
            assert shown[name] == (setting.setting.default_text or "none"), name
        else:
            assert shown[name] == format_value(applied), (command, name, applied)
        checked += 1
    assert checked > 40
    # the shorthand switches show the state their setting starts in
    assert shown["--lora"] == ("on" if config.train_llm == "lora" else "off")
    assert shown["--freeze-llm"] == ("on" if config.train_llm == "frozen" else "off")


@pytest.mark.parametrize("command", STAGES)
def test_help_fits_80_columns_with_whole_names(command):
    text = _help(command)
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    for setting in declared_settings():
        if setting.setting.flag and command in setting.setting.commands:
            assert setting.option_names[0] in text
        elif setting.setting.flag:  # dpo's options are offered by dpo alone
            assert setting.option_names[0] not in text


def test_a_preference_option_elsewhere_is_refused_with_the_command_to_use():
    result = CliRunner().invoke(app, ["finetune", "--beta", "0.2"])
    assert result.exit_code == 2
    assert "--beta is a dpo option: use llava dpo" in " ".join(result.output.split())


# LLaVA-1.5's scripts/v1_5/pretrain.sh, finetune.sh, finetune_lora.sh and LLaVA-NeXT's
# scripts/train/dpo.sh: learning rate, epochs, per-device batch, accumulation, schedule,
# warmup ratio, weight decay.
SCRIPTS = {
    "pretrain": (1e-3, 1, 32, 1, "cosine", 0.03, 0.0),
    "finetune": (2e-5, 1, 16, 1, "cosine", 0.03, 0.0),
    "lora": (2e-4, 1, 16, 1, "cosine", 0.03, 0.0),
    "dpo": (5e-7, 3, 1, 16, "linear", 0.1, 0.0),
}


@pytest.mark.parametrize("command", STAGES)
def test_stage_defaults_are_the_original_scripts(command):
    config = resolve_config(command)
    args = config.training_args
    assert (args["learning_rate"], args["num_train_epochs"],
            args["per_device_train_batch_size"], args.get("gradient_accumulation_steps", 1),
            args["lr_scheduler_type"], config.warmup_ratio,
            args["weight_decay"]) == SCRIPTS[command]
    if command == "lora":
        assert (config.lora_r, config.lora_alpha, config.projector_lr) == (128, 256, 2e-5)
    if command == "dpo":
        assert (config.beta, config.objective) == (0.1, "dpo")
    if command == "pretrain":
        assert (config.template, config.train_llm, config.image_aspect_ratio) == (
            "plain", "frozen", "square")


def test_settings_reference_is_current():
    written = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    assert written == settings_reference(), (
        "docs/settings.md is stale: python -m llava_cli.config.declared > docs/settings.md")


def test_trainer_fields_read_from_source_equal_the_real_class():
    """What `config.trainer_fields` reads from transformers' source without importing it:
    the same fields and defaults as the imported TrainingArguments, and an enum field takes
    exactly the enum's values."""
    read, real = trainer_fields(), _from_import()
    assert set(read) == set(real)
    for name, field in read.items():
        theirs = getattr(real[name].default, "value", real[name].default)
        if field.default is not NO_DEFAULT:
            assert field.default == theirs, name
    assert isinstance(read["learning_rate"], TrainerField)
    from llava_cli.config.run_config import ConfigError

    with pytest.raises(ConfigError, match="save_strategy: 'sometimes' is not one of no, steps"):
        resolve_config("finetune", sets=["save_strategy=sometimes"])
    assert resolve_config("finetune", sets=['save_strategy="no"']).training_args[
        "save_strategy"] == "no"  # YAML's quotes keep it text, as a recipe would


def test_a_checkpoint_shows_its_own_feature_layer(tmp_path):
    """--print-config shows what a local checkpoint really uses, not a new model's default;
    an explicit value stays marked as given (model.start then refuses a mismatch)."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llava", "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full"}))
    config = resolve_config("finetune", flags={"model_name_or_path": str(tmp_path)})
    assert (config.vision_select_layer, config.vision_select_feature) == (-1, "cls_patch")
    assert "vision_select_layer" not in config.model_fields_set
    given = resolve_config("finetune", flags={"model_name_or_path": str(tmp_path),
                                              "vision_select_layer": -3})
    assert given.vision_select_layer == -3 and "vision_select_layer" in given.model_fields_set
    result = CliRunner().invoke(app, ["finetune", "--model-name-or-path", str(tmp_path),
                                      "--print-config"])
    assert "vision_select_layer: -1" in result.output

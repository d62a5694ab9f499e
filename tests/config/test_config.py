"""Configuration: precedence, LLaVA aliases, TrainingArguments pass-through, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.config.declared import stage_layer
from llava_cli.config.resolve import parse_set, resolve_config
from llava_cli.config.run_config import ConfigError, save_resolved
from llava_cli.train.arguments import argument_values

runner = CliRunner()

ROOT = Path(__file__).resolve().parents[2]


def _recipe(tmp_path, **keys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(keys))
    return path


def _given(config, expected: dict) -> bool:
    """The Trainer fields given, exactly as given (typed); the rest of `training_args` is the
    stage's declared defaults (`config.declared.stage_layer`)."""
    defaults = stage_layer("finetune")["training_args"]
    rest = {k: v for k, v in config.training_args.items() if k not in expected}
    return ({k: config.training_args.get(k, "missing") for k in expected} == expected
            and all(v == defaults[k] for k, v in rest.items()))


def test_precedence_preset_recipe_set_flag(tmp_path):
    recipe = _recipe(tmp_path, template="llava_llama_2", learning_rate=1e-3, model_max_length=512)
    config = resolve_config("finetune", recipe, ["learning_rate=2e-5", "model_max_length=1024"],
                            {"model_max_length": 4096, "template": None})
    assert config.template == "llava_llama_2"  # recipe beats the default
    assert config.training_args["learning_rate"] == 2e-5  # --set beats the recipe
    assert config.model_max_length == 4096  # a flag beats --set; None flags are ignored
    assert resolve_config("pretrain").template == "plain"  # stage preset


def test_lora_preset_and_llava_aliases(tmp_path):
    config = resolve_config("lora")
    assert (config.train_llm, config.lora_r, config.lora_alpha) == ("lora", 128, 256)
    assert config.projector_lr == 2e-5 and config.training_args["learning_rate"] == 2e-4
    recipe = _recipe(tmp_path, version="v1", tune_mm_mlp_adapter=True, mm_projector_lr=2e-5,
                     mm_vision_select_layer=-1, freeze_mm_mlp_adapter=False)
    config = resolve_config("finetune", recipe)
    assert (config.template, config.train_llm, config.projector_lr,
            config.vision_select_layer) == ("v1", "frozen", 2e-5, -1)


def test_any_training_argument_is_accepted():
    config = resolve_config("finetune", sets=["warmup_ratio=0.03", "lr_scheduler_type=cosine",
                                              "report_to=[]"])
    # LLaVA's warmup_ratio is kept as written; transformers 5 gets a fractional warmup_steps
    assert config.warmup_ratio == 0.03
    assert _given(config, {"lr_scheduler_type": "cosine", "report_to": []})
    values = argument_values(config, "out", on_cpu=True, workers=0)
    assert values["warmup_steps"] == 0.03 and "warmup_ratio" not in values


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match=r"unknown configuration key 'learning_rat' \(did you "
                       r"mean 'learning_rate'\?\) \(from --set or the command line\)"):
        resolve_config("finetune", sets=["learning_rat=1"])


def test_every_unknown_key_is_named_in_one_error():
    with pytest.raises(ConfigError, match=r"unknown configuration keys 'learning_rat' \(did you "
                       r"mean 'learning_rate'\?\), 'zzz_qqq' \(from"):
        resolve_config("finetune", sets=["learning_rat=1", "seed=3", "zzz_qqq=2"])


def test_bad_values_and_files(tmp_path):
    with pytest.raises(ConfigError, match="tokenization: 'fast' is not one of hf, llava"):
        resolve_config("finetune", sets=["tokenization=fast"])
    with pytest.raises(ConfigError, match="unknown template 'v9'"):
        resolve_config("finetune", sets=["template=v9"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["learning_rate"])
    with pytest.raises(ConfigError, match="not found"):
        resolve_config("finetune", tmp_path / "missing.yaml")
    assert resolve_config("finetune", sets=["mm_use_im_start_end=true"]).mm_use_im_start_end
    with pytest.raises(ConfigError, match="mm_use_im_start_end: template 'chat-template' is "
                       "the tokenizer's own"):
        resolve_config("finetune", sets=["mm_use_im_start_end=true", "template=chat-template"])


def test_saved_config_loads_back_equal(tmp_path):
    config = resolve_config("finetune", sets=["learning_rate=3e-5", "template=chatml"])
    path = save_resolved(config, tmp_path / "out")
    again = resolve_config("finetune", path)
    assert again == config


def test_numbers_in_a_nested_training_args_block_are_numbers(tmp_path):
    recipe = _recipe(tmp_path, training_args={"learning_rate": "2e-5", "max_steps": 3})
    assert _given(resolve_config("finetune", recipe), {"learning_rate": 2e-5, "max_steps": 3})


def test_saved_run_config_has_absolute_local_paths(tmp_path, monkeypatch):
    from llava_cli.config.run_config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.json").write_text("[]")
    config = resolve_config("finetune", flags={"data_path": "data.json",
                                               "model_name_or_path": "lmsys/vicuna-7b-v1.5"})
    fixed = with_absolute_paths(config)
    assert fixed.data_path == str(tmp_path / "data.json")
    assert fixed.model_name_or_path == "lmsys/vicuna-7b-v1.5"  # a hub id stays as it is


def _deepspeed(tmp_path, **sections):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": "auto",
                                **sections}))
    return str(path)


def test_deepspeed_conflicts_are_refused_before_anything_is_built(tmp_path):
    zero3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")
    with pytest.raises(ConfigError, match=r"QLoRA \(bits 4/8\) cannot run under DeepSpeed "
                                          r"ZeRO-3: bitsandbytes weights cannot be partitioned"):
        resolve_config("lora", flags={"bits": 4, "deepspeed": zero3})
    assert resolve_config("lora", flags={"deepspeed": zero3}).bits == 16

    # DeepSpeed's schedulers give every parameter group one rate: LoRA's projector_lr 2e-5
    # would silently become the LLM's 2e-4.
    warmup = _deepspeed(tmp_path, scheduler={"type": "WarmupLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": "auto", "warmup_num_steps": "auto"}})
    with pytest.raises(ConfigError) as refused:
        resolve_config("lora", flags={"deepspeed": warmup})
    assert (f"projector_lr cannot apply: the DeepSpeed config {warmup!r} defines "
            "\"scheduler\", and DeepSpeed's optimizer takes all parameters as one group, its "
            "schedulers give every group one learning rate. Remove the section(s): the "
            "Trainer's optimizer and lr_scheduler_type schedule are used and keep each "
            "component's rate. Or unset projector_lr") in str(refused.value)
    # Its own optimizer: one flat group of parameters (LLaVA's zero3_offload.json has both).
    adamw = _deepspeed(tmp_path, optimizer={"type": "AdamW", "params": {"lr": "auto"}})
    with pytest.raises(ConfigError, match='defines "optimizer", and DeepSpeed'):
        resolve_config("lora", flags={"deepspeed": adamw})
    with pytest.raises(ConfigError, match="projector_lr and vision_tower_lr cannot apply"):
        resolve_config("finetune", flags={"deepspeed": warmup, "projector_lr": 1e-5,
                                          "vision_tower_lr": 2e-6})
    # One rate for everything: DeepSpeed's scheduler is the user's choice.
    assert resolve_config("finetune", flags={"deepspeed": warmup}).projector_lr is None
    assert resolve_config("lora", flags={"deepspeed": _deepspeed(tmp_path)}).projector_lr == 2e-5


@pytest.mark.parametrize(("item", "message"), [
    ("learning_rate=abc", "learning_rate: expected a number, got 'abc'"),
    ("seed=1.5", "seed: expected a whole number, got '1.5'"),
    ("max_steps=4e0", "max_steps: expected a whole number, got '4e0'"),
    ("bf16=maybe", "bf16: expected true or false, got 'maybe'"),
    ("model_max_length=lots", "model_max_length: expected a whole number"),
])
def test_a_value_its_field_cannot_take_is_an_error_up_front(item, message):
    with pytest.raises(ConfigError, match=re.escape(message) + r".*\(from --set or the command "
                       r"line\)"):
        resolve_config("finetune", sets=[item])


def test_values_are_read_by_their_fields_type_in_recipes_and_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("save_strategy: no\nrun_name: 1e5\nlr_scheduler_kwargs: {min_lr: 1e-6}\n"
                      "bf16: yes\nlearning_rate: 2e-5\nmax_steps: 10\n")
    for config in (resolve_config("finetune", recipe),
                   resolve_config("finetune", sets=[
                       "save_strategy=no", "run_name=1e5", "lr_scheduler_kwargs={min_lr: 1e-6}",
                       "bf16=yes", "learning_rate=2e-5", "max_steps=10"])):
        assert _given(config, {  # YAML 1.1 would have made "no" False, "1e5" 1e5
            "save_strategy": "no", "run_name": "1e5", "lr_scheduler_kwargs": {"min_lr": 1e-6},
            "bf16": True, "learning_rate": 2e-5, "max_steps": 10})
        assert isinstance(config.training_args["lr_scheduler_kwargs"]["min_lr"], float)


def test_print_config_shows_what_was_written_and_what_the_trainer_gets(tmp_path):
    result = runner.invoke(app, ["finetune", "--set", "warmup_ratio=0.03", "--no-bf16",
                                 "--set", "save_strategy=no", "--print-config"])
    assert result.exit_code == 0, result.output
    config, trainer = result.output.split("trainer_arguments:")
    assert "warmup_ratio: 0.03" in config and "warmup_steps" not in config
    assert "warmup_steps: 0.03" in trainer and "save_strategy: 'no'" in trainer
    assert "bf16: false" in trainer and "report_to: none" in trainer  # our defaults shown
    refused = runner.invoke(app, ["finetune", "--set", "do_eval=true", "--print-config"])
    assert refused.exit_code == 2 and "needs held-out records" in refused.stderr


def test_every_switch_has_its_no_form():
    result = runner.invoke(app, ["lora", "--no-lora", "--no-gradient-checkpointing",
                                 "--no-unfreeze-vision-tower", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "train_llm: full" in result.output and "train_vision_tower: frozen" in result.output


def test_empty_values_are_null_and_odd_numbers_are_named_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pretrained_projector:\ntokenizer:\nlearning_rate: .inf\n")
    config = resolve_config("finetune", recipe)
    assert config.pretrained_projector is None and config.tokenizer is None
    assert config.training_args["learning_rate"] == float("inf")
    with pytest.raises(ConfigError, match="warmup_ratio: must be at least 0 and below 1"):
        resolve_config("finetune", sets=["warmup_ratio=1.0"])


def test_a_saved_configuration_naming_a_reporter_reads_back_without_it():
    from llava_cli.config.run_config import RunConfig

    saved = RunConfig.model_validate({"training_args": {"report_to": "wandb"}})
    assert saved.training_args["report_to"] == "wandb"  # merge-lora on another machine
    with pytest.raises(ConfigError, match="pip install wandb"):
        resolve_config("finetune", sets=["report_to=wandb"])


@pytest.mark.parametrize("epochs", ["0", "-1", "0.0"])
def test_zero_epochs_without_max_steps_is_refused(epochs):
    result = runner.invoke(app, ["finetune", "--epochs", epochs, "--print-config"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip() == (
        f"llava finetune: invalid configuration:\n  num_train_epochs (--epochs) is "
        f"{float(epochs):g}: nothing would be trained; give a positive number of epochs (0.5 "
        "is half of one), or max_steps")
    with pytest.raises(ConfigError, match=r"num_train_epochs \(--epochs\) is 0"):
        resolve_config("pretrain", sets=["num_train_epochs=0"])
    # max_steps decides the length then (transformers lets it override the epochs).
    assert resolve_config("finetune", flags={"num_train_epochs": 0, "max_steps": 5}
                          ).training_args["max_steps"] == 5
    assert resolve_config("finetune", flags={"num_train_epochs": 0.5}
                          ).training_args["num_train_epochs"] == 0.5


def test_the_image_check_keys_reach_the_data_options():
    config = resolve_config("finetune", sets=["image_check=full",
                                              "allow_images_outside_folder=true",
                                              "image_folder=imgs", "eval_image_folder=held"])
    for options in (config.data_options(), config.data_options(held_out=True)):
        assert (options.image_check, options.allow_images_outside_folder) == ("full", True)
    default = resolve_config("finetune").data_options()
    assert (default.image_check, default.allow_images_outside_folder) == ("fast", False)
    with pytest.raises(ConfigError, match="image_check"):
        resolve_config("finetune", sets=["image_check=header"])

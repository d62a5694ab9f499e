"""The original train.py command line turned into ours (a pure function), and the one table
of LLaVA's and InternVL's names."""

from __future__ import annotations

import re

import pytest

from llava_cli.config.original_args import (
    OptionSpec,
    accepted_notes,
    normalise_argv,
    notes_for,
    split_original_pairs,
)
from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import ConfigError

OURS = OptionSpec(valued=["--set", "--deepspeed", "--batch-size", "--output-dir", "-o"],
                  switches={"--bf16": "--no-bf16", "--freeze-llm": "--no-freeze-llm",
                            "--print-config": None, "--help": None})


def test_original_spellings_become_set_items_and_ours_stay():
    argv = ["--model_name_or_path", "lmsys/vicuna-13b-v1.5", "--version", "plain",
            "--mm_vision_select_layer", "-2", "--weight_decay", "0.", "--evaluation_strategy",
            "no", "--deepspeed", "./scripts/zero2.json", "--batch-size", "4",
            "--learning_rate=1e-3", "--lazy_preprocess", "--output-dir", "out"]
    assert normalise_argv(argv, OURS) == [
        "--set", "model_name_or_path=lmsys/vicuna-13b-v1.5", "--set", "version=plain",
        "--set", "mm_vision_select_layer=-2", "--set", "weight_decay=0.",
        "--set", "evaluation_strategy=no", "--deepspeed", "./scripts/zero2.json",
        "--batch-size", "4", "--set", "learning_rate=1e-3", "--set", "lazy_preprocess=true",
        "--output-dir", "out"]


def test_our_switches_take_true_and_false_as_the_switch_or_its_no_form():
    assert normalise_argv(["--bf16", "True", "--freeze-llm", "False", "--bf16=false"], OURS) \
        == ["--bf16", "--no-freeze-llm", "--no-bf16"]
    assert normalise_argv(["--bf16", "recipe.yaml"], OURS) == ["--bf16", "recipe.yaml"]
    assert normalise_argv(["--print-config", "--help"], OURS) == ["--print-config", "--help"]


def test_positionals_dashes_and_hf_kebab_spellings():
    assert normalise_argv(["recipe.yaml", "--per-device-train-batch-size", "2", "--", "--x"],
                          OURS) == ["recipe.yaml", "--set", "per_device_train_batch_size=2",
                                    "--", "--x"]


def test_split_pairs_reads_as_hf_argument_parser():
    assert split_original_pairs(["--a", "1", "--b", "--c=x y", "--d", "-2"]) == [
        ("a", "1"), ("b", "true"), ("c", "x y"), ("d", "-2")]
    with pytest.raises(ValueError, match="'tensorboard' follows no --name"):
        split_original_pairs(["--report_to", "wandb", "tensorboard"])


def test_notes_once_each_for_the_accepted_no_ops():
    notes = notes_for(["lazy_preprocess", "bf16", "lazy_preprocess", "cache_dir"])
    assert [n.split(":")[0] for n in notes] == ["lazy_preprocess", "cache_dir"]
    assert {"lazy_preprocess", "mm_use_im_patch_token", "cache_dir", "mpt_attn_impl",
            "mm_patch_merge_type"} <= set(accepted_notes())


def test_the_original_names_resolve_where_llava_meant_them():
    config = resolve_config("finetune", sets=[
        "evaluation_strategy=no", "freeze_llm=True", "mm_use_im_patch_token=True",
        "image_grid_pinpoints=[(336, 672), (672, 336)]", "mm_patch_merge_type=flat",
        "cache_dir=/tmp/x", "mpt_attn_impl=triton", "mm_use_im_start_end=False",
        "version=chatml_direct", "tf32=True"])
    assert config.training_args["eval_strategy"] == "no"
    assert config.training_args["tf32"] is True
    assert config.train_llm == "frozen" and config.template == "chatml_direct"
    assert config.image_grid_pinpoints == [[336, 672], [672, 336]]
    assert not config.mm_use_im_start_end
    assert resolve_config("finetune", sets=["mm_use_im_start_end=True"]).mm_use_im_start_end
    for yaml_form in ("[[336, 672]]", "null"):  # as our saved configs write it
        again = resolve_config("finetune", sets=[f"image_grid_pinpoints={yaml_form}"])
        assert again.image_grid_pinpoints == ([[336, 672]] if yaml_form != "null" else None)


@pytest.mark.parametrize(("item", "message"), [
    ("mm_patch_merge_type=spatial_unpad", "mm_patch_merge_type 'spatial_unpad': only 'flat'"),
    ("image_grid_pinpoints=[(336,", "image_grid_pinpoints '[(336,': expected pairs like"),
    ("image_grid_pinpoints=[(1, 2, 3)]", "image_grid_pinpoints '[(1, 2, 3)]': expected pairs"),
    ("lazy_preprocess=recipe.yaml", "lazy_preprocess 'recipe.yaml': expected True or False"),
])
def test_what_would_change_training_silently_is_refused(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config("finetune", sets=[item])


def test_internvl_and_llava_trainability_names_map_onto_ours():
    tuned = resolve_config("finetune", sets=["tune_vit_pos_embedding=True"])
    assert tuned.train_vision_tower == "position_embedding"
    frozen = resolve_config("finetune", sets=["freeze_backbone=True"])
    assert (frozen.train_llm, frozen.train_lm_head) == ("frozen", "full")


@pytest.mark.parametrize("sets", [
    ["tune_mm_mlp_adapter=True", "freeze_backbone=True"],
    ["freeze_backbone=True", "tune_mm_mlp_adapter=True"],
])
def test_the_originals_switches_act_in_its_code_order_whatever_the_script_order(sets):
    # train.py: freeze_backbone, then tune_mm_mlp_adapter's requires_grad_(False) of all but
    # the projector: lm_head frozen too, and the output is a projector.
    config = resolve_config("finetune", sets=sets)
    assert (config.train_llm, config.train_lm_head, config.output_kind) == (
        "frozen", "frozen", "projector")


@pytest.mark.parametrize("sets", [
    ["unfreeze_mm_vision_tower=True", "tune_vit_pos_embedding=True"],
    ["tune_vit_pos_embedding=True", "unfreeze_mm_vision_tower=True"],
])
def test_a_whole_tower_wins_over_its_position_embedding_in_either_order(sets):
    assert resolve_config("finetune", sets=sets).train_vision_tower == "full"


def test_lora_after_freeze_backbone_keeps_lm_head_frozen_as_peft_does():
    config = resolve_config("finetune", sets=["lora_enable=True", "freeze_backbone=True"])
    assert (config.train_llm, config.train_lm_head, config.output_kind) == (
        "lora", "frozen", "lora")

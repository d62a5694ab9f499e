"""train.arguments: the pure mapping from the configuration onto LlavaTrainingArguments, and
the LoRA mapper in model.lora."""

from __future__ import annotations

import json
import os

import pytest

from llava_cli.artifacts.manifest import OutputKind
from llava_cli.config.resolve import resolve_config
from llava_cli.train.arguments import LlavaTrainingArguments, argument_values
from tests.helpers import ROOT

ZERO3 = str(ROOT / "recipes" / "deepspeed" / "zero3.json")


def test_the_mapping_is_pure_and_carries_our_settings(tmp_path):
    config = resolve_config("lora", flags={"deepspeed": ZERO3, "projector_lr": 3e-5,
                                           "group_by_modality_length": True})
    environment = dict(os.environ)
    on_cpu = argument_values(config, str(tmp_path), on_cpu=True, workers=3)
    assert dict(os.environ) == environment  # no RANK/MASTER_PORT set by the mapping
    assert argument_values(config, str(tmp_path), on_cpu=True, workers=3) == on_cpu
    assert on_cpu["use_cpu"] is True and on_cpu["dataloader_num_workers"] == 3
    assert (on_cpu["projector_lr"], on_cpu["vision_tower_lr"]) == (3e-5, None)
    assert on_cpu["group_by_modality_length"] and on_cpu["supervised_logits_only"]
    assert on_cpu["output_kind"] is OutputKind.LORA and on_cpu["deepspeed"] == ZERO3
    on_gpu = argument_values(config, str(tmp_path), on_cpu=False, workers=0)
    assert "use_cpu" not in on_gpu and "dataloader_pin_memory" not in on_gpu


def test_our_fields_live_in_the_training_arguments(tmp_path):
    config = resolve_config("pretrain", flags={"vision_tower_lr": 1e-5})
    values = argument_values(config, str(tmp_path), on_cpu=True, workers=0)
    args = LlavaTrainingArguments(**values)
    assert (args.output_kind, args.vision_tower_lr, args.projector_lr) == (
        OutputKind.PROJECTOR, 1e-5, None)
    saved = json.loads(args.to_json_string())  # what training_args.bin / logs describe
    assert saved["output_kind"] == "projector" and saved["supervised_logits_only"] is True


def test_lora_config_is_a_pure_mapping_of_the_run_configuration():
    pytest.importorskip("peft")
    from llava_cli.model.lora import lora_config

    config = resolve_config("lora", flags={"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
                                           "train_vision_tower": "full"})
    mapped = lora_config(config, ["model.language_model.layers.0.mlp.fc1"])
    assert (mapped.r, mapped.lora_alpha, mapped.lora_dropout, mapped.bias) == (8, 16, 0.1,
                                                                                "none")
    assert mapped.target_modules == {"model.language_model.layers.0.mlp.fc1"}
    assert mapped.modules_to_save == ["multi_modal_projector", "vision_tower"]
    frozen = lora_config(resolve_config("lora", flags={"train_projector": "frozen"}), [])
    assert frozen.modules_to_save is None

"""A real run with the original's trainability names: `freeze_backbone` (decoder frozen,
lm_head trained) and `tune_vit_pos_embedding` (the tower's position embedding trained) — the
saved full checkpoint holds exactly those changes and loads with stock transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from llava_cli.config.resolve import resolve_config
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.start import load_starting_model
from llava_cli.train.run import run_training
from tests.helpers import TINY_LLM, TINY_VISION


def test_freeze_backbone_and_tune_vit_pos_embedding_train_what_the_original_trains(tmp_path):
    records, images = demo_data()
    config = resolve_config("finetune", flags={
        "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
        "tokenizer": "demo", "random_init": True, "data_path": records, "image_folder": images,
        "max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "seed": 7,
        "freeze_backbone": True, "tune_vit_pos_embedding": True,
        "output_dir": str(tmp_path / "run")})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        transformers.set_seed(7)
        before = {k: v.clone() for k, v in load_starting_model(config).model.state_dict().items()}
        result = run_training(config)
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(result.output_dir)
    after = saved.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight", "model.vision_tower.embeddings.position_embedding.weight",
                       *(f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2)
                         for p in ("weight", "bias"))}


def test_a_linear_projector_pretrains_its_one_layer_and_exports_as_the_original(tmp_path):
    from llava_cli.artifacts.export import export_projector

    records, images = demo_data()
    config = resolve_config("pretrain", flags={
        "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
        "tokenizer": "demo", "random_init": True, "data_path": records, "image_folder": images,
        "skip_bad_records": True, "max_steps": 2, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "seed": 7, "projector_type": "linear",
        "output_dir": str(tmp_path / "run")})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        transformers.set_seed(7)
        before = {k: v.clone() for k, v in load_starting_model(config).model.state_dict().items()}
        result = run_training(config)
    after = result.trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.multi_modal_projector.linear_1.weight",
                       "model.multi_modal_projector.linear_1.bias"}
    export_projector(result.output_dir, tmp_path / "mm_projector.bin")
    exported = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    assert set(exported) == {"model.mm_projector.weight", "model.mm_projector.bias"}
    finetune = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(result.output_dir), "data_path": records,
        "image_folder": images, "max_steps": 2, "per_device_train_batch_size": 2,
        "output_dir": str(tmp_path / "finetune")}))
    saved = transformers.LlavaForConditionalGeneration.from_pretrained(finetune.output_dir)
    second = saved.model.multi_modal_projector.linear_2
    assert saved.config.projector_hidden_act == "linear"
    assert torch.equal(second.weight, torch.eye(64)) and not second.bias.any()
    # The manifest says what the model is, not the run's (default) projector_type.
    manifest = json.loads((finetune.output_dir / "llava_run.json").read_text())
    assert manifest["projector_type"] == "linear"
    export_projector(result.output_dir, tmp_path / "p.safetensors")
    sidecar = json.loads((tmp_path / "p.safetensors.json").read_text())
    assert sidecar["projector_type"] == "linear"

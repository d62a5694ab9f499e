"""The shipped recipes: every one resolves, the LLaVA-1.5 ones carry LLaVA-1.5's published
hyperparameters, the DeepSpeed configs are sound, and the tiny chain trains end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_cli.artifacts.manifest import MANIFEST_NAME
from llava_cli.config.resolve import resolve_config
from llava_cli.train.arguments import to_training_arguments
from llava_cli.train.run import run_training

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
DEEPSPEED = RECIPES / "deepspeed"
DEMO_RECIPES = ROOT / "llava_cli" / "demo" / "recipes"  # package data: `llava demo` reads them
YAMLS = sorted(RECIPES.glob("**/*.yaml")) + sorted(DEMO_RECIPES.glob("*.yaml"))
LLAVA_15 = ["llava-v1.5-7b", "llava-v1.5-13b"]
GPUS = 8  # LLaVA-1.5 trained on 8 x A100-80GB; the global batch assumes it

# Per stage: (learning rate, template, global batch, deepspeed config) from scripts/v1_5/*.sh
STAGES = {
    "pretrain": (1e-3, "plain", 256, "zero2.json"),
    "finetune": (2e-5, "v1", 128, "zero3.json"),
    "lora": (2e-4, "v1", 128, "zero3.json"),
}
SAVE_STEPS = {"pretrain": 24000, "finetune": 50000, "lora": 50000}


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    """Recipe paths are relative to the repository root."""
    monkeypatch.chdir(ROOT)


def _resolve(path: Path, **flags):
    return resolve_config(path.stem, path, flags=flags)


def test_recipes_are_shipped():
    names = {str(p.relative_to(RECIPES)) for p in YAMLS if p.is_relative_to(RECIPES)}
    assert {f"{model}/{stage}.yaml" for model in [*LLAVA_15, "tiny"] for stage in STAGES} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_resolves_and_starts_with_its_command(path):
    assert path.stem in (*STAGES, "dpo"), "recipe file names say their command"
    config = _resolve(path)
    assert config.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"llava_cli {path.stem} {path.relative_to(ROOT)}" in first


@pytest.mark.parametrize("model", LLAVA_15)
@pytest.mark.parametrize("stage", list(STAGES))
def test_llava_15_hyperparameters(model, stage):
    path = RECIPES / model / f"{stage}.yaml"
    config = _resolve(path)
    args = config.training_args
    lr, template, global_batch, zero = STAGES[stage]
    assert args["learning_rate"] == lr
    assert config.template == template
    assert (args["per_device_train_batch_size"] * args["gradient_accumulation_steps"] * GPUS
            == global_batch)
    assert args["num_train_epochs"] == 1
    assert args["weight_decay"] == 0
    assert config.warmup_ratio == 0.03 and "warmup_steps" not in args  # as the recipe says
    assert args["lr_scheduler_type"] == "cosine"
    assert args["bf16"] is True and args["tf32"] is True
    assert args["gradient_checkpointing"] is True
    assert args["dataloader_num_workers"] == 4
    assert args["save_steps"] == SAVE_STEPS[stage] and args["save_total_limit"] == 1
    assert args["logging_steps"] == 1
    assert args["report_to"] == "none"
    assert config.model_max_length == 2048
    assert args["deepspeed"] == f"recipes/deepspeed/{zero}"
    assert (ROOT / args["deepspeed"]).is_file()
    assert config.train_vision_tower == "frozen"
    size = model.removeprefix("llava-v1.5-")
    if stage == "pretrain":
        assert config.model_name_or_path == f"lmsys/vicuna-{size}-v1.5"
        assert config.vision_tower == "openai/clip-vit-large-patch14-336"
        assert (config.projector_type, config.vision_select_layer) == ("mlp2x_gelu", -2)
        assert config.vision_select_feature == "patch"
        assert config.data_path.endswith("LLaVA-Pretrain/blip_laion_cc_sbu_558k.json")
        assert config.image_folder.endswith("LLaVA-Pretrain/images")
        assert config.image_aspect_ratio == "square"  # LLaVA's default; pretrain.sh sets none
        assert (config.train_llm, config.train_projector) == ("frozen", "full")
        assert config.output_dir == f"./checkpoints/llava-v1.5-{size}-pretrain"
    else:
        assert config.model_name_or_path == f"./checkpoints/llava-v1.5-{size}-pretrain"
        assert config.data_path.endswith("llava_v1_5_mix665k.json")
        assert config.image_folder == "./playground/data"
        assert config.image_aspect_ratio == "pad"
        assert config.group_by_modality_length is True
        assert config.train_projector == "full"
    if stage == "finetune":
        assert config.train_llm == "full" and config.projector_lr is None
    if stage == "lora":
        assert config.train_llm == "lora"
        assert (config.lora_r, config.lora_alpha, config.projector_lr) == (128, 256, 2e-5)


def _deepspeed(name: str) -> dict:
    return json.loads((DEEPSPEED / name).read_text())


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_deepspeed_configs_leave_the_schedule_to_the_trainer(name):
    config = _deepspeed(name)
    assert "scheduler" not in config and "optimizer" not in config
    assert config["bf16"]["enabled"] == "auto"
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config["gradient_accumulation_steps"] == "auto"
    assert config["train_batch_size"] == "auto"


def test_deepspeed_stages():
    assert _deepspeed("zero2.json")["zero_optimization"]["stage"] == 2
    for name in ("zero3.json", "zero3_offload.json"):
        zero = _deepspeed(name)["zero_optimization"]
        assert zero["stage"] == 3
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    offload = _deepspeed("zero3_offload.json")
    zero = offload["zero_optimization"]
    assert zero["offload_param"]["device"] == "cpu"
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in offload  # LLaVA's WarmupLR would replace the cosine schedule
    assert offload["zero_force_ds_cpu_optimizer"] is False  # the Trainer's AdamW, offloaded


def test_tiny_model_configs_are_valid():
    import transformers

    llm = transformers.AutoConfig.from_pretrained(RECIPES / "tiny" / "llm")
    assert (llm.model_type, llm.vocab_size, llm.hidden_size, llm.num_hidden_layers) == (
        "llama", 600, 64, 2)
    vision = transformers.CLIPVisionConfig.from_pretrained(RECIPES / "tiny" / "vision")
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (32, 8, 32)


@pytest.mark.parametrize("stage", list(STAGES))
def test_tiny_recipes_build_training_arguments(stage, tmp_path):
    config = _resolve(RECIPES / "tiny" / f"{stage}.yaml")
    assert config.tokenizer in (None, "demo") and Path(config.data_path).is_file()
    args = to_training_arguments(config, str(tmp_path))
    assert args.max_steps == 4 and args.per_device_train_batch_size == 2
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 0.03
    assert args.output_dir == str(tmp_path) and args.deepspeed is None


def test_tiny_chain_trains_end_to_end(tmp_path):
    starts = {"pretrain": None, "finetune": tmp_path / "pretrain",
              "lora": tmp_path / "finetune"}
    kinds = {"pretrain": "projector", "finetune": "full", "lora": "lora"}
    for stage, start in starts.items():
        flags = {"output_dir": str(tmp_path / stage)}
        if start is not None:
            flags["model_name_or_path"] = str(start)
        config = _resolve(RECIPES / "tiny" / f"{stage}.yaml", **flags)
        if stage == "pretrain":
            with pytest.warns(UserWarning, match="RANDOM weights"):
                result = run_training(config)
        else:
            result = run_training(config)
        assert result.kind == kinds[stage]
        manifest = json.loads((tmp_path / stage / MANIFEST_NAME).read_text())
        assert manifest["kind"] == kinds[stage]
        assert result.trainer.state.global_step == 4

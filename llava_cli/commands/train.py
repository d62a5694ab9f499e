"""`llava pretrain | finetune | lora`: options → configuration overrides → one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llava_cli.commands.common import (
    PrintConfig,
    Recipe,
    SetOption,
    config_or_exit,
    show_config,
)
from llava_cli.commands.pending import not_implemented

PRETRAIN_HELP = "Stage 1: align the projector (vision tower and LLM frozen, template plain)."
FINETUNE_HELP = "Stage 2: instruction-tune (full, or --lora / --bits 4|8 for LoRA/QLoRA)."
LORA_HELP = "Stage 2 with LoRA and LLaVA-1.5's LoRA defaults (r 128, alpha 256, lr 2e-4)."

MODEL = "Model"
DATA = "Data"
TRAIN = "Training"
OUT = "Output"


def _make_command(stage: str) -> Any:
    def command(
        recipe: Recipe = None,
        set_: SetOption = None,
        print_config: PrintConfig = False,
        model_name_or_path: Annotated[str | None, typer.Option(
            help="LLM (new model) or an existing LLaVA / pretrain output.",
            rich_help_panel=MODEL)] = None,
        vision_tower: Annotated[str | None, typer.Option(
            help="CLIP or SigLIP vision model.", rich_help_panel=MODEL)] = None,
        projector_type: Annotated[str | None, typer.Option(
            help="mlp2x_gelu | linear | mlpNx_gelu.", rich_help_panel=MODEL)] = None,
        pretrained_projector: Annotated[str | None, typer.Option(
            help="Projector weights (ours or LLaVA's mm_projector.bin).",
            rich_help_panel=MODEL)] = None,
        random_init: Annotated[bool | None, typer.Option(
            help="Build LLM/vision tower from config without weights (demo/tests only).",
            rich_help_panel=MODEL)] = None,
        lora: Annotated[bool | None, typer.Option(
            "--lora", help="Train the LLM with LoRA.", rich_help_panel=MODEL)] = None,
        bits: Annotated[int | None, typer.Option(
            help="Quantize the LLM to 4 or 8 bits (QLoRA).", rich_help_panel=MODEL)] = None,
        data_path: Annotated[str | None, typer.Option(
            help="LLaVA JSON or JSON Lines file.", rich_help_panel=DATA)] = None,
        image_folder: Annotated[str | None, typer.Option(
            help="Folder that image paths are relative to.", rich_help_panel=DATA)] = None,
        template: Annotated[str | None, typer.Option(
            help="Conversation template.", rich_help_panel=DATA)] = None,
        model_max_length: Annotated[int | None, typer.Option(
            help="Maximum tokens per sample, image tokens included.",
            rich_help_panel=DATA)] = None,
        learning_rate: Annotated[float | None, typer.Option(
            "--learning-rate", "--lr", rich_help_panel=TRAIN)] = None,
        num_train_epochs: Annotated[float | None, typer.Option(
            "--epochs", rich_help_panel=TRAIN)] = None,
        max_steps: Annotated[int | None, typer.Option(rich_help_panel=TRAIN)] = None,
        per_device_train_batch_size: Annotated[int | None, typer.Option(
            "--batch-size", rich_help_panel=TRAIN)] = None,
        deepspeed: Annotated[str | None, typer.Option(
            help="DeepSpeed JSON config.", rich_help_panel=TRAIN)] = None,
        output_dir: Annotated[str | None, typer.Option(
            "--output-dir", "-o", rich_help_panel=OUT)] = None,
        overwrite: Annotated[bool | None, typer.Option(
            "--overwrite", help="Allow writing into a non-empty output directory.",
            rich_help_panel=OUT)] = None,
    ) -> None:
        flags = {
            "model_name_or_path": model_name_or_path, "vision_tower": vision_tower,
            "projector_type": projector_type, "pretrained_projector": pretrained_projector,
            "random_init": random_init, "train_llm": "lora" if lora else None, "bits": bits,
            "data_path": data_path, "image_folder": image_folder, "template": template,
            "model_max_length": model_max_length, "learning_rate": learning_rate,
            "num_train_epochs": num_train_epochs, "max_steps": max_steps,
            "per_device_train_batch_size": per_device_train_batch_size,
            "deepspeed": deepspeed, "output_dir": output_dir, "overwrite": overwrite,
        }
        config = config_or_exit(stage, recipe, set_, flags)
        if print_config:
            show_config(config)
            return
        not_implemented(stage)

    command.__name__ = stage
    return command


pretrain = _make_command("pretrain")
finetune = _make_command("finetune")
lora = _make_command("lora")

__all__ = ["pretrain", "finetune", "lora", "Path"]

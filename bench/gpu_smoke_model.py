"""The model, batches and FLOP count of `gpu_smoke.py` (see its docstring).

Imports torch, transformers, peft (LoRA only) and, from the repository root, two llava_cli
modules that need only torch and numpy: the supervised-positions loss
(`train.supervised_loss`) and the collator that pads or packs samples
(`data.batching.collator`), so the smoke measures the very code training runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# LLaVA-665k's lengths as `llava inspect-data --check` measured them (Llama-2 tokenizer, 576
# image tokens): p50 815, p90 1100, p99 1372, max 1835. A log-normal through p50 and p90.
LENGTH_P50, LENGTH_P90, LENGTH_MAX = 815, 1100, 2048


def configs(tiny: bool) -> Any:
    """LlavaConfig: LLaVA-1.5-7B's shapes, or a toy of the same structure with `tiny`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        text = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512)
        vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4)
        image_token = 600
    else:  # meta-llama/Llama-2-7b-hf and openai/clip-vit-large-patch14-336, as published
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, rms_norm_eps=1e-5)
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                                  intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, projection_dim=768,
                                  hidden_act="quick_gelu")
        image_token = 32000  # LLaVA-1.5: the first id past Llama-2's vocabulary
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu",
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2)


def build_model(config: Any, device: str, dtype: Any, lora: bool, attn: str) -> Any:
    """Random-init LLaVA on `device` (initialised there: fast on a GPU), vision tower frozen
    (LLaVA-1.5 stage 2), LoRA r 128 / alpha 256 on the LLM's linears with `lora`."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config.text_config.use_cache = False
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                           attn_implementation=attn)
    parts(model).vision_tower.requires_grad_(False)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = (r".*language_model\.layers\.\d+\."
                   r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
        model = get_peft_model(model, LoraConfig(
            r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets,
            modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
    return model.train()


def parts(model: Any) -> Any:
    """The module holding vision_tower / multi_modal_projector / language_model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "model", base)


@dataclass(frozen=True)
class Levers:
    """llava_cli's speed levers, each on or off."""

    supervised_logits: bool = True  # LM head + loss at supervised positions only
    packing: bool = True  # the step's samples in packed rows, not padded
    frozen_no_backward: bool = True  # no input-grad hook on the frozen tower
    checkpointing: bool = True  # non-reentrant activation checkpointing

    def without(self, name: str) -> Levers:
        """These levers with `name` off."""
        return Levers(**{**self.__dict__, name: False})


def apply_levers(model: Any, levers: Levers) -> None:
    """Switch checkpointing and the frozen tower's input-grad hook on the live model (the
    loss and the batch layout are chosen per step)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if levers.checkpointing:  # transformers 5 names it activation checkpointing
        enable = getattr(base, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()
    if levers.checkpointing and not levers.frozen_no_backward:
        base.enable_input_require_grads()  # what transformers' checkpointing does by default
    else:
        base.disable_input_require_grads()


def sample_lengths(count: int, tiny: bool, seed: int) -> list[int]:
    """Mixed lengths (image tokens included) drawn like LLaVA-665k's; toy lengths with `tiny`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if tiny:
        return [int(x) for x in rng.integers(20, 48, size=count)]
    sigma = math.log(LENGTH_P90 / LENGTH_P50) / 1.2816  # z of the 90th percentile
    drawn = rng.lognormal(math.log(LENGTH_P50), sigma, size=count)
    return [int(x) for x in np.clip(drawn, 600, LENGTH_MAX)]


def synthetic_samples(config: Any, lengths: list[int], dtype: Any, seed: int = 0,
                      prompt_fraction: float = 0.5) -> list[dict[str, Any]]:
    """One sample per length: BOS, the image tokens, random text; labels mask BOS, the image
    and the first `prompt_fraction` of the text (the prompt), as LLaVA does."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    image_tokens, vocab = config.image_seq_length, config.text_config.vocab_size
    size = config.vision_config.image_size
    samples = []
    for length in lengths:
        text = torch.randint(3, min(vocab, config.image_token_id), (length - image_tokens - 1,),
                             generator=generator)
        ids = torch.cat([torch.ones(1, dtype=torch.long),
                         torch.full((image_tokens,), config.image_token_id), text])
        labels = ids.clone()
        labels[:image_tokens + 1 + int(len(text) * prompt_fraction)] = -100
        samples.append({"input_ids": ids, "labels": labels,
                        "pixel_values": torch.randn(1, 3, size, size, generator=generator)
                        .to(dtype)})
    return samples


def collate(samples: list[dict[str, Any]], packing: bool, budget: int, attn: str,
            device: str) -> dict[str, Any]:
    """llava_cli's collator: padded rows, or packs of ≤ `budget` tokens (rows with restarting
    positions; one flattened row for flash-attention), as training lays them out."""
    from llava_cli.data.batching.collator import DataCollator

    flash = attn.startswith("flash_attention")
    if packing:
        packs, row, used = [], [], 0
        for sample in samples:  # in order: the same samples, whatever the layout
            if row and used + len(sample["input_ids"]) > budget:
                packs.append(row)
                row, used = [], 0
            row.append(sample)
            used += len(sample["input_ids"])
        packs.append(row)
        batch = DataCollator(pad_token_id=0, padding_free=flash, pack_rows=not flash)(packs)
    else:
        batch = DataCollator(pad_token_id=0)(samples)
    return {key: value.to(device) for key, value in batch.items()}


def step_loss(model: Any, batch: dict[str, Any], supervised_logits: bool) -> Any:
    """The plain HF loss (full [rows, seq, vocab] logits) or llava_cli's loss at the
    supervised positions only (equal value)."""
    from llava_cli.train.supervised_loss import supervised_cross_entropy, supervised_positions

    if not supervised_logits:
        return model(**batch, use_cache=False).loss
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = model(**inputs, use_cache=False, logits_to_keep=supervised_positions(labels))
    return supervised_cross_entropy(outputs, labels)


def model_flops_per_step(model: Any, config: Any, lengths: list[int], lora: bool) -> float:
    """Model FLOPs of one step over the samples' real tokens (padding is not useful work):
    (6 or, LoRA, 4)·N per token for the LLM and its LM head, attention 12·layers·hidden·len²
    per sample, the frozen tower 2·N_vision per patch, the projector 6·N_proj per image token."""
    inner = parts(model)
    n_llm = sum(p.numel() for n, p in inner.language_model.named_parameters()
                if "embed_tokens" not in n and "lora_" not in n)
    n_vision = sum(p.numel() for p in inner.vision_tower.parameters())
    n_proj = sum(p.numel() for n, p in inner.multi_modal_projector.named_parameters()
                 if "original_module" not in n)
    text, images = config.text_config, len(lengths)
    per_token = 4 if lora else 6
    tokens = sum(lengths)
    llm = per_token * (n_llm + text.hidden_size * text.vocab_size) * tokens
    attention = 12 * text.num_hidden_layers * text.hidden_size * sum(n * n for n in lengths)
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    vision = 2 * n_vision * patches * images
    projector = 6 * n_proj * config.image_seq_length * images
    return float(llm + attention + vision + projector)

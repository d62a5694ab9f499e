"""LoRA and QLoRA: which modules get adapters (a pure mapping from the run configuration to
PEFT's `LoraConfig`), and the PEFT wrapping. Trainability itself is set in `model.parts`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llava_cli.model.parts import apply_trainability

if TYPE_CHECKING:
    from peft import LoraConfig

    from llava_cli.config.run_config import RunConfig

# Only the LLM's decoder linears; anchored on `language_model.layers.N` so that the vision
# tower (which also has q/k/v projections) and lm_head are never adapted.
LORA_TARGET_REGEX = (r".*language_model\.layers\.\d+\."
                     r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")


def lora_config(config: RunConfig) -> LoraConfig:
    """PEFT's LoraConfig for a run: rank, alpha, dropout and bias from the configuration,
    adapters on the LLM's linears only, and the components trained in full next to LoRA
    (projector, vision tower) as `modules_to_save`, so they are saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        bias=config.lora_bias, target_modules=LORA_TARGET_REGEX, task_type="CAUSAL_LM",
        modules_to_save=_fully_trained_modules(config) or None)


def apply_lora(model: Any, config: RunConfig, dtype: Any = None) -> Any:
    """Wrap the model with LoRA on the LLM's linear layers (PeftModel); sets trainability.

    Quantized models get `prepare_model_for_kbit_training` first (frozen, fp32 norms).
    `dtype`: the dtype DeepSpeed trains in (bf16/fp16 runs): the new LoRA weights, which PEFT
    makes in float32, are cast to it, as the original LLaVA casts before adding LoRA —
    DeepSpeed flattens the trainable weights into one buffer of one dtype.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    if config.train_llm != "lora":
        raise ValueError("apply_lora needs train_llm: lora")
    if is_quantized(model):
        # Checkpointing is left to the Trainer (non-reentrant, set up once at train start):
        # enabling it here too would register input-grad hooks that nothing can remove later.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, lora_config(config))
    if dtype is not None:
        _cast_unpartitioned(peft_model, dtype)
    apply_trainability(peft_model, config.train_vision_tower, config.train_projector, "lora")
    return peft_model


def _cast_unpartitioned(model: Any, dtype: Any) -> None:
    """Floating-point weights made after ZeRO-3 partitioned the model (PEFT's) to `dtype`;
    partitioned ones already are in DeepSpeed's dtype."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)


def _fully_trained_modules(config: RunConfig) -> list[str]:
    """Components trained in full next to LoRA: PEFT must save them with the adapter."""
    return [module for module, mode in (("multi_modal_projector", config.train_projector),
                                        ("vision_tower", config.train_vision_tower))
            if mode == "full"]


def is_quantized(model: Any) -> bool:
    """Whether the model was loaded with bitsandbytes 4/8-bit weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)

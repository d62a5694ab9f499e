"""LoRA and QLoRA: which modules get adapters, bitsandbytes settings, and the PEFT wrapping.

Trainability itself is still set in one place, `model_factory.apply_trainability`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llava_cli.model_factory import apply_trainability

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from llava_cli.config import RunConfig

# Only the LLM's decoder linears; anchored on `language_model.layers.N` so that the vision
# tower (which also has q/k/v projections) and lm_head are never adapted.
LORA_TARGET_REGEX = (r".*language_model\.layers\.\d+\."
                     r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
# bnb in transformers 5 matches these from the start of the full module name (not substrings).
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def apply_lora(model: Any, config: RunConfig) -> Any:
    """Wrap the model with LoRA on the LLM's linear layers (PeftModel); sets trainability.

    The projector (and the vision tower) become `modules_to_save` modules when trained in
    full, so their weights are saved with the adapter. Quantized models get
    `prepare_model_for_kbit_training` first (frozen, fp32 norms).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.train_llm != "lora":
        raise ValueError("apply_lora needs train_llm: lora")
    if is_quantized(model):
        # Checkpointing is left to the Trainer (non-reentrant, set up once at train start):
        # enabling it here too would register input-grad hooks that nothing can remove later.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora_config = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        bias=config.lora_bias, target_modules=LORA_TARGET_REGEX, task_type="CAUSAL_LM",
        modules_to_save=_fully_trained_modules(config) or None)
    peft_model = get_peft_model(model, lora_config)
    apply_trainability(peft_model, config.train_vision_tower, config.train_projector, "lora")
    return peft_model


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


def quantization_config(config: RunConfig) -> BitsAndBytesConfig | None:
    """bitsandbytes settings for `bits` 4/8 (vision tower, projector, lm_head kept float)."""
    import torch
    from transformers import BitsAndBytesConfig

    if config.bits == 16:
        return None
    if config.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)
    # fp32 compute on CPU: no bf16 hardware there, and bf16 compute was ~4x slower.
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant, bnb_4bit_compute_dtype=compute,
        llm_int8_skip_modules=QUANT_SKIP_MODULES)

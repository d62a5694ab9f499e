"""LoRA and QLoRA: which modules get adapters (every linear layer of the LLM, found in the
model, or the kinds `lora_target_modules` names), PEFT's `LoraConfig` for a run, and the PEFT
wrapping. Trainability itself is set in `model.parts`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llava_cli.model.parts import apply_trainability, base_model, components

if TYPE_CHECKING:
    from peft import LoraConfig

    from llava_cli.config.run_config import RunConfig

ALL_LINEAR = "all-linear"


def lora_targets(model: Any, choice: str | list[str] = ALL_LINEAR) -> list[str]:
    """Full names of the LLM's linear layers that get LoRA adapters, sorted.

    As the original LLaVA's `find_all_linear_names`: every linear layer of the language model
    (any architecture: Llama's q/k/v/o/gate/up/down, Phi-3's fused qkv/gate_up, GPT-NeoX's
    query_key_value, …), never the vision tower, the projector or lm_head — found by walking
    the LLM decoder module itself, so no name pattern can miss a layer kind or reach the
    vision tower. `choice`: 'all-linear', or the layer kinds to keep (leaf names as the
    original lists them, e.g. ["q_proj", "v_proj"]).
    """
    linears = _llm_linears(model)
    if choice == ALL_LINEAR:
        return sorted(linears)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in linears})
    if not choice:
        raise ValueError("lora_target_modules is empty; name layer kinds (e.g. [q_proj, "
                         "v_proj]) or give 'all-linear'")
    for kind in choice:
        if kind not in kinds:
            raise ValueError(f"lora_target_modules: {kind!r} is no linear layer of this LLM; "
                             f"choose among {', '.join(kinds)} (or 'all-linear')")
    return sorted(name for name in linears if name.rsplit(".", 1)[-1] in choice)


def _llm_linears(model: Any) -> list[str]:
    """Names (in `model`) of every linear layer inside the LLM decoder; GPT-2-style Conv1D
    counts as linear, as in PEFT."""
    import torch
    from transformers.pytorch_utils import Conv1D

    llm = components(model).llm
    base = base_model(model)
    prefix = next(name for name, module in base.named_modules() if module is llm)
    return [f"{prefix}.{name}" for name, module in llm.named_modules()
            if isinstance(module, torch.nn.Linear | Conv1D)]


def lora_config(config: RunConfig, targets: list[str]) -> LoraConfig:
    """PEFT's LoraConfig for a run: rank, alpha, dropout and bias from the configuration,
    adapters on exactly `targets` (full module names, from `lora_targets`), and the
    components trained in full next to LoRA (projector, vision tower) as `modules_to_save`,
    so they are saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        bias=config.lora_bias, target_modules=list(targets), task_type="CAUSAL_LM",
        modules_to_save=_fully_trained_modules(config) or None)


def lora_layers(model: Any) -> list[str]:
    """The layers a PeftModel carries LoRA adapters on (names in the base model), sorted:
    what was wrapped, for the run summary and the tests."""
    base = base_model(model)
    return sorted(name for name, module in base.named_modules()
                  if hasattr(module, "lora_A") and hasattr(module, "base_layer"))


def apply_lora(model: Any, config: RunConfig, dtype: Any = None) -> Any:
    """Wrap the model with LoRA on the LLM's linear layers (`lora_targets` of
    `lora_target_modules`) as a PeftModel; sets trainability.

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
    targets = lora_targets(model, config.lora_target_modules)
    peft_model = get_peft_model(model, lora_config(config, targets))
    if lora_layers(peft_model) != targets:  # PEFT matches by suffix: say so if it strayed
        raise ValueError(f"LoRA wrapped {len(lora_layers(peft_model))} layers, not the "
                         f"{len(targets)} chosen; report this with the model's config")
    if dtype is not None:
        _cast_unpartitioned(peft_model, dtype)
    apply_trainability(peft_model, config.train_vision_tower, config.train_projector, "lora",
                       config.train_lm_head)
    return peft_model


def _cast_unpartitioned(model: Any, dtype: Any) -> None:
    """Floating-point weights made after ZeRO-3 partitioned the model (PEFT's) to `dtype`;
    partitioned ones already are in DeepSpeed's dtype."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and not hasattr(param, "ds_id"):
            param.data = param.data.to(dtype)


def _fully_trained_modules(config: RunConfig) -> list[str]:
    """Components trained (in full or in part) next to LoRA: PEFT must save them with the
    adapter — a partly trained tower whole, as PEFT saves modules."""
    return [module for module, mode in (("multi_modal_projector", config.train_projector),
                                        ("vision_tower", config.train_vision_tower),
                                        ("lm_head", config.train_lm_head or "frozen"))
            if mode != "frozen"]


def is_quantized(model: Any) -> bool:
    """Whether the model was loaded with bitsandbytes 4/8-bit weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "hf_quantizer", None) is not None)

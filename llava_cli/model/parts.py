"""The parts of a LLaVA model and their trainability: the one place that knows the module
layout (`components`) and the one place that sets `requires_grad` (`apply_trainability`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Components:
    """The four parts of a LLaVA model, as live modules."""

    vision_tower: Any
    projector: Any
    llm: Any  # the decoder (embeddings + layers + norm), without lm_head
    lm_head: Any


def components(model: Any) -> Components:
    """The vision tower, projector, LLM decoder and lm_head (through a PeftModel too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    return Components(inner.vision_tower, inner.multi_modal_projector, inner.language_model,
                      base.lm_head)


def apply_trainability(model: Any, vision: str, projector: str, llm: str) -> dict[str, int]:
    """Set requires_grad for every parameter; returns trainable counts per component.

    'frozen' → no grads, 'full' → all grads, 'lora' (LLM only) → only the LoRA weights added
    by `apply_lora` (the base stays frozen). lm_head and the input embeddings follow the LLM.
    Under PEFT's modules_to_save only the trainable copy is trained, never `original_module`.
    """
    for name, mode in (("train_vision_tower", vision), ("train_projector", projector)):
        if mode == "lora":
            raise ValueError(f"{name}: 'lora' is not supported (use 'frozen' or 'full')")
    for name, mode in (("train_llm", llm), ("train_vision_tower", vision),
                       ("train_projector", projector)):
        if mode not in ("frozen", "full", "lora"):
            raise ValueError(f"{name}: {mode!r} is not one of frozen, full, lora")
    model.requires_grad_(False)  # then switch on exactly what is asked for
    parts = components(model)
    bias = _lora_bias(model)
    plan = {"vision_tower": (parts.vision_tower, vision), "projector": (parts.projector, projector),
            "llm": (parts.llm, llm), "lm_head": (parts.lm_head, llm)}
    for module, mode in plan.values():
        for name, param in module.named_parameters():
            param.requires_grad_(_wants_grad(name, mode, param, bias))
    newline = _image_newline(model)
    if newline is not None and projector == "full":
        # LLaVA-NeXT's learned row separator belongs to the projector side.
        newline.requires_grad_(True)
    return trainable_counts(model)


def trainable_counts(model: Any) -> dict[str, int]:
    """Trainable parameters per component (vision tower, projector, LLM, lm_head)."""
    parts = components(model)
    counts = {key: sum(p.numel() for p in module.parameters() if p.requires_grad)
              for key, module in (("vision_tower", parts.vision_tower),
                                  ("projector", parts.projector), ("llm", parts.llm),
                                  ("lm_head", parts.lm_head))}
    newline = _image_newline(model)
    if newline is not None and newline.requires_grad:
        counts["projector"] += newline.numel()
    return counts


def _image_newline(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.model, "image_newline", None)


def _lora_bias(model: Any) -> str:
    peft_config = getattr(model, "peft_config", {}).get("default")
    return getattr(peft_config, "bias", "none") or "none"


def _wants_grad(name: str, mode: str, param: Any, bias: str) -> bool:
    if mode == "lora":
        # lora_bias 'all' trains the LLM's biases only (PEFT's own 'all' would reach vision too)
        return ("lora_" in name or (bias == "all" and name.endswith(".bias"))
                or (bias == "lora_only" and name.endswith("base_layer.bias")))
    if mode != "full" or "original_module" in name:
        return False
    return param.is_floating_point()  # quantized storage (uint8/int8) cannot take grads

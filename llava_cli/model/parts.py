"""The parts of a LLaVA model and their trainability: the one place that knows the module
layout (`components`, the vision tower's parts in `tower_parameters`) and the one place that
sets `requires_grad` (`apply_trainability`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_cli.config.run_config import tower_parts


@dataclass
class Components:
    """The four parts of a LLaVA model, as live modules."""

    vision_tower: Any
    projector: Any
    llm: Any  # the decoder (embeddings + layers + norm), without lm_head
    lm_head: Any


def without_engine(model: Any) -> Any:
    """The model a DDP wrapper or a DeepSpeed engine holds (its `.module`); `model` itself
    when it is not wrapped. A PeftModel stays a PeftModel."""
    import torch

    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def base_model(model: Any) -> Any:
    """The transformers model inside DDP, a DeepSpeed engine and PEFT (the one unwrapping
    rule: `without_engine`, then the PeftModel's `get_base_model()`)."""
    model = without_engine(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def components(model: Any) -> Components:
    """The vision tower, projector, LLM decoder and lm_head (through DDP, DeepSpeed and PEFT
    wrappers too: `base_model`)."""
    base = base_model(model)
    inner = base.model
    return Components(inner.vision_tower, inner.multi_modal_projector, inner.language_model,
                      base.lm_head)


def apply_trainability(model: Any, vision: str, projector: str, llm: str,
                       lm_head: str | None = None, im_start_end: bool = False
                       ) -> dict[str, int]:
    """Set requires_grad for every parameter; returns trainable counts per component.

    'frozen' → no grads, 'full' → all grads, 'lora' (LLM only) → only the LoRA weights added
    by `apply_lora` (the base stays frozen). The vision tower may also train some of its
    parts only (`tower_parameters`: its position embedding, its last N layers). The input
    embeddings follow the LLM; lm_head follows it too unless `lm_head` says otherwise (LLaVA's
    `freeze_backbone` freezes the decoder and keeps lm_head trainable). With `im_start_end`
    and the original's stage 1 (LLM and lm_head frozen, projector trained: its
    `tune_mm_mlp_adapter`) the input embeddings train too (`trains_input_embeddings`).
    Under PEFT's modules_to_save only the trainable copy is trained, never `original_module`.
    """
    if projector == "lora" or vision == "lora":
        name = "train_projector" if projector == "lora" else "train_vision_tower"
        raise ValueError(f"{name}: 'lora' is not supported (use 'frozen' or 'full')")
    for name, mode in (("train_llm", llm), ("train_projector", projector),
                       ("train_lm_head", lm_head or "full")):
        if mode not in ("frozen", "full", "lora"):
            raise ValueError(f"{name}: {mode!r} is not one of frozen, full, lora")
    model.requires_grad_(False)  # then switch on exactly what is asked for
    parts = components(model)
    bias = _lora_bias(model)
    # lm_head before the LLM: a head tied to the input embeddings is the LLM's, as in the
    # original (its freeze_backbone freezes the shared tensor, head included)
    plan = {"projector": (parts.projector, projector),
            "lm_head": (parts.lm_head, lm_head or llm), "llm": (parts.llm, llm)}
    if vision in ("frozen", "full"):
        plan["vision_tower"] = (parts.vision_tower, vision)
    else:
        chosen = {id(param) for param in tower_parameters(model, vision)}
        for param in parts.vision_tower.parameters():
            param.requires_grad_(id(param) in chosen)
    for module, mode in plan.values():
        for name, param in module.named_parameters():
            param.requires_grad_(_wants_grad(name, mode, param, bias))
    if is_single_linear(model):  # its second layer is the fixed identity: never trained
        for param in _trained_copy(parts.projector).linear_2.parameters():
            param.requires_grad_(False)
    if im_start_end and (llm, lm_head or llm, projector) == ("frozen", "frozen", "full"):
        _train_input_embeddings(parts)
    newline = _image_newline(model)
    if newline is not None and projector == "full":
        # LLaVA-NeXT's learned row separator belongs to the projector side.
        newline.requires_grad_(True)
    return trainable_counts(model)


def _train_input_embeddings(parts: Components) -> None:
    """The original's `initialize_vision_tokenizer` under `tune_mm_mlp_adapter`: the whole
    input-embedding matrix trains, so the new `<im_start>`/`<im_end>` rows learn (a row
    changes only where its token is in a prompt: no other row gets a gradient); the output
    embeddings stay frozen."""
    weight = parts.llm.get_input_embeddings().weight
    if any(param is weight for param in parts.lm_head.parameters()):
        raise ValueError("mm_use_im_start_end with a frozen LLM trains the input embeddings "
                         "but not lm_head, and this LLM ties the two (tie_word_embeddings): "
                         "the original then trains neither; train the LLM (finetune) instead")
    weight.requires_grad_(True)


def trains_input_embeddings(model: Any) -> bool:
    """Whether the input embeddings train while the LLM itself is frozen (`im_start_end` in
    stage 1): a projector output then carries them (`model.projector.projector_state`)."""
    parts = components(model)
    return parts.llm.get_input_embeddings().weight.requires_grad and not any(
        param.requires_grad for name, param in parts.llm.named_parameters()
        if "embed_tokens" not in name)


def is_single_linear(model: Any) -> bool:
    """Whether the projector is LLaVA's `linear` in the stock layout: linear_1, the identity
    activation, and linear_2 the identity matrix (`model.build` makes it so)."""
    base = base_model(model)
    return getattr(base.config, "projector_hidden_act", None) == "linear"


def tower_parameters(model: Any, spec: str) -> list[Any]:
    """The vision-tower parameters a parts declaration trains (`tower_parts` reads it):
    `position_embedding` (InternVL's `tune_vit_pos_embedding`) and `last_N_layers` — the
    last N of the encoder layers whose output the projector reads (with the default feature
    layer -2 the very last layer feeds nothing, so it is not counted)."""
    position, last = tower_parts(spec)
    tower = _trained_copy(components(model).vision_tower)
    chosen: list[Any] = []
    if position:
        embedding = getattr(getattr(tower, "embeddings", None), "position_embedding", None)
        if embedding is None:
            raise ValueError(f"train_vision_tower {spec!r}: this vision tower has no "
                             "embeddings.position_embedding; train it full or frozen")
        chosen += list(_own_parameters(embedding))
    if last:
        layers = tower.encoder.layers
        feeding = _layers_feeding_features(model, len(layers))
        if last > feeding:
            raise ValueError(f"train_vision_tower {spec!r}: only {feeding} encoder layers "
                             "feed the projector (vision_select_layer); ask for fewer")
        for layer in list(layers)[feeding - last:feeding]:
            chosen += list(layer.parameters())
    return chosen


def _trained_copy(module: Any) -> Any:
    """The copy PEFT trains of a `modules_to_save` module (the module itself otherwise)."""
    copies = getattr(module, "modules_to_save", None)
    return copies[next(iter(copies))] if copies else module


def _own_parameters(part: Any) -> list[Any]:
    # CLIP and SigLIP hold an nn.Embedding; InternViT a bare nn.Parameter
    return [part] if not hasattr(part, "parameters") else list(part.parameters())


def _layers_feeding_features(model: Any, count: int) -> int:
    """How many encoder layers run before the features the projector reads:
    hidden_states[k] is the output of layer k (0 = the embeddings)."""
    base = base_model(model)
    layer = base.config.vision_feature_layer
    indices = layer if isinstance(layer, list) else [layer]
    return max(k if k >= 0 else count + 1 + k for k in indices)


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
    base = base_model(model)
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

"""Build, load and set trainability of LLaVA models (transformers' own classes).

The model is always `LlavaForConditionalGeneration`, so what we save loads with stock
transformers and vLLM. This module is the one place that knows the module layout
(`components`) and the one place that sets `requires_grad` (`apply_trainability`; LoRA and
quantization settings live in `adapters`).
Heavy imports stay inside the functions: only training commands import this module.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cli.text_side import CLIP_MEAN, IMAGE_TOKEN

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from llava_cli.config import RunConfig

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


@dataclass
class Components:
    """The four parts of a LLaVA model, as live modules."""

    vision_tower: Any
    projector: Any
    llm: Any  # the decoder (embeddings + layers + norm), without lm_head
    lm_head: Any


def _dtype(name: str | None) -> torch.dtype:
    import torch

    # None means float32: predictable on CPU, where bf16 is emulated and ~4x slower.
    if name in (None, "auto", "float32", "fp32"):
        return torch.float32
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype {name!r}: use float32, bfloat16 or float16")
    return dtype


def _check_projector(projector_type: str) -> None:
    match = _MLP_RE.match(projector_type)
    if match and int(match.group(1)) == 2:
        return
    if projector_type == "linear" or (match and int(match.group(1)) >= 3):
        raise NotImplementedError(
            f"projector_type {projector_type!r} needs a registered projector class and would "
            "not load in stock transformers/vLLM (not built yet); use mlp2x_gelu")
    raise ValueError(f"unknown projector_type {projector_type!r}; use mlp2x_gelu")


def _vision_config(path: str, trust_remote_code: bool) -> PretrainedConfig:
    """The vision config of a CLIP/SigLIP folder (full two-tower model or vision-only)."""
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(loaded, "vision_config", None) or loaded


def _has_cls(vision_config: PretrainedConfig) -> bool:
    # CLIP prepends a CLS embedding; SigLIP has none (all positions are patches).
    return "siglip" not in vision_config.model_type


def _select_strategy(config: RunConfig, vision_config: PretrainedConfig) -> str:
    if not _has_cls(vision_config):
        return "full"  # "default" would drop a real patch, not a CLS token
    return "full" if config.vision_select_feature == "cls_patch" else "default"


def image_tokens_per_image(model_config: PretrainedConfig) -> int:
    """Image tokens one image becomes (LLaVA, fixed size); matches `build_processor`.

    LLaVA-NeXT (anyres) counts depend on each image's size: ask its processor instead.
    """
    if getattr(model_config, "image_grid_pinpoints", None):
        raise ValueError("anyres (LLaVA-NeXT): the image-token count depends on the image "
                         "size; use the processor (it inserts the right count per image)")
    vision = model_config.vision_config
    per_side = vision.image_size // vision.patch_size
    extra = int(_has_cls(vision))
    drop = int(model_config.vision_feature_select_strategy == "default")
    return per_side * per_side + extra - drop


def build_processor(vision_path: str, vision_config: PretrainedConfig, tokenizer: Any,
                    strategy: str, pinpoints: list[list[int]] | None = None) -> Any:
    """LlavaProcessor (LlavaNextProcessor with `pinpoints`) whose image-token count agrees
    with the model's image features."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    processor_cls = LlavaNextProcessor if pinpoints else LlavaProcessor
    return processor_cls(
        image_processor=_image_processor(vision_path, vision_config, pinpoints),
        tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(_has_cls(vision_config)), image_token=IMAGE_TOKEN)


def _image_processor(vision_path: str, vision_config: PretrainedConfig,
                     pinpoints: list[list[int]] | None) -> Any:
    from transformers import AutoImageProcessor, CLIPImageProcessorPil, LlavaNextImageProcessorPil

    saved = Path(vision_path) / "preprocessor_config.json"
    if pinpoints:
        # Keep the tower's resize/normalisation settings, add the anyres grid.
        settings = json.loads(saved.read_text()) if saved.is_file() else _default_image(
            vision_config)
        keep = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor")
        return LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints,
                                          **{k: settings[k] for k in keep if k in settings})
    if saved.is_file():
        # AutoImageProcessor keeps SigLIP's own resize/normalisation; pil: no torchvision here.
        return AutoImageProcessor.from_pretrained(vision_path, backend="pil")
    return CLIPImageProcessorPil(**_default_image(vision_config))


def _default_image(vision_config: PretrainedConfig) -> dict[str, Any]:
    size = vision_config.image_size
    mean, std = (CLIP_MEAN, CLIP_STD) if _has_cls(vision_config) else ((0.5,) * 3,) * 2
    return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
            "image_mean": list(mean), "image_std": list(std)}


def _load_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained`, with missing weights turned into an error that says what to do."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"{what} {path!r}: no weights could be loaded ({err}). Point it at a folder with "
            "model weights, or set random_init: true to train from random weights "
            "(for tests only)") from err


def build_new_model(config: RunConfig, tokenizer: Any) -> tuple[Any, Any]:
    """A new LLaVA from a causal-LM folder and a CLIP/SigLIP folder; returns (model, processor).

    Without `config.random_init` the LLM and vision weights must load (else an error); with it,
    both are random from their config.json (and a warning says so).
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    if not config.model_name_or_path or not config.vision_tower:
        raise ValueError("a new model needs model_name_or_path (LLM) and vision_tower")
    _check_projector(config.projector_type)
    remote = config.trust_remote_code
    text_config = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=remote)
    vision_config = _vision_config(config.vision_tower, remote)
    strategy = _select_strategy(config, vision_config)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError("the tokenizer has no <image> token; call add_llava_tokens first")
    pinpoints = _pinpoints(config, vision_config)
    config_cls, model_cls = ((LlavaNextConfig, LlavaNextForConditionalGeneration) if pinpoints
                             else (LlavaConfig, LlavaForConditionalGeneration))
    extra = {"image_grid_pinpoints": pinpoints} if pinpoints else {}
    llava_config = config_cls(
        **extra, vision_config=vision_config, text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=config.vision_select_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    dtype = _dtype(config.torch_dtype)
    model = model_cls._from_config(
        llava_config, attn_implementation=config.attn_implementation, dtype=dtype)
    _init_new_parts(model, config.random_init)
    if config.random_init:
        warnings.warn("random_init: the LLM and the vision tower have RANDOM weights (nothing "
                      "was loaded); only for tests and smoke runs", UserWarning, stacklevel=2)
    else:
        kwargs = {"dtype": dtype, "trust_remote_code": remote}
        llm = _load_pretrained(AutoModelForCausalLM, config.model_name_or_path, "LLM", **kwargs)
        vision = _load_pretrained(_vision_class(vision_config), config.vision_tower,
                                  "vision tower", **kwargs)
        parts = components(model)
        with torch.no_grad():
            parts.llm.load_state_dict(llm.get_decoder().state_dict())
            parts.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
            parts.vision_tower.load_state_dict(vision.state_dict())
        del llm, vision
    model.resize_token_embeddings(len(tokenizer))  # exact: no pad_to_multiple_of
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = build_processor(config.vision_tower, vision_config, tokenizer, strategy,
                                pinpoints)
    return model, processor


def _init_new_parts(model: Any, random_tower: bool) -> None:
    """The projector starts as LLaVA's does: PyTorch's default Linear init, not transformers'
    normal(0, 0.02), which is so small that a from-scratch tower behind it barely learns.
    A random-init (demo/test) CLIP tower gets position embeddings of std 1: at transformers'
    0.02 the patches are nearly indistinguishable by position and the demo's tiny tower never
    learned where a shape is (measured: left/right at chance; 0.9 with both changes)."""
    import torch

    parts = components(model)
    for layer in parts.projector.modules():
        if isinstance(layer, torch.nn.Linear):
            layer.reset_parameters()
    embeddings = getattr(getattr(parts.vision_tower, "vision_model", parts.vision_tower),
                         "embeddings", None)
    position = getattr(embeddings, "position_embedding", None)
    if random_tower and isinstance(position, torch.nn.Embedding):
        with torch.no_grad():
            position.weight.normal_(0.0, 1.0)


def _pinpoints(config: RunConfig, vision_config: PretrainedConfig) -> list[list[int]] | None:
    """Anyres grid (LLaVA-NeXT) or None; default: 1x1, 1x2, 2x1, 2x2 tiles of the tower size."""
    if config.image_aspect_ratio != "anyres":
        return None
    s = vision_config.image_size
    return config.image_grid_pinpoints or [[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _vision_class(vision_config: PretrainedConfig) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(vision_config)]


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


def _keep_used_weight_conversions(model: Any) -> None:
    """Make `save_pretrained` write the layout the model was loaded from, under ZeRO-3 too.

    transformers 5.24 remembers the key renamings it applied while loading and reverses them on
    save. Its ordinary loader keeps only the renamings that matched a key; its ZeRO-3 loader
    keeps all of them, legacy ones included, so a ZeRO-3 run saved `vision_tower.vision_model.*`
    and `language_model.model.model.*` — a layout only transformers 5's own legacy mapping
    reads back. Keep the used ones here, as the ordinary loader does (a no-op there).
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions
                                     if getattr(c, "was_used", lambda: True)()]


def load_llava(path: str, config: RunConfig, for_training: bool = True) -> Any:
    """Load a saved HF-layout LLaVA (ours or llava-hf), quantized when `config.bits` < 16."""
    from transformers import AutoModelForImageTextToText

    from llava_cli.adapters import quantization_config

    quant = quantization_config(config)
    kwargs: dict[str, Any] = {"dtype": _dtype(config.torch_dtype),
                              "attn_implementation": config.attn_implementation,
                              "trust_remote_code": config.trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = _load_pretrained(AutoModelForImageTextToText, path, "LLaVA model", **kwargs)
    _keep_used_weight_conversions(model)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model

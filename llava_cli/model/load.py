"""Loading saved LLaVA checkpoints (ours or llava-hf), quantized when asked, and pretrained
parts with an error that says what to do when their weights are missing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

    from llava_cli.config.run_config import RunConfig

# bnb in transformers 5 matches these from the start of the full module name (not substrings).
QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def torch_dtype(name: str | None) -> torch.dtype:
    """The dtype a `torch_dtype` setting names; None (and "auto") mean float32."""
    import torch

    # None means float32: predictable on CPU, where bf16 is emulated and ~4x slower.
    if name in (None, "auto", "float32", "fp32"):
        return torch.float32
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"torch_dtype {name!r}: use float32, bfloat16 or float16")
    return dtype


def load_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained`, with missing weights turned into an error that says what to do."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"{what} {path!r}: no weights could be loaded ({err}). Point it at a folder with "
            "model weights, or set random_init: true to train from random weights "
            "(for tests only)") from err


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

    quant = quantization_config(config)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(config.load_dtype),
                              "attn_implementation": config.attn_implementation,
                              "trust_remote_code": config.trust_remote_code}
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = load_pretrained(AutoModelForImageTextToText, path, "LLaVA model", **kwargs)
    _keep_used_weight_conversions(model)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model

"""Loading saved LLaVA checkpoints (ours or llava-hf), quantized when asked, and pretrained
parts — strictly: weights that are missing, damaged or not the model's are an error naming the
folder, the component and the keys, never random weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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


class WeightsError(ValueError):
    """A model folder whose weights are missing, incomplete or not this model's."""


# Said when a folder's weights cannot all be loaded: what the user can do about it.
RESTORE = ("restore its weight files (re-save or re-download the model) or point at a "
           "complete copy")
# Keys a full two-tower checkpoint (CLIPModel, SiglipModel) has beside its vision model:
# loading it as a vision tower (the real CLIP-L/336 is one) leaves them out, as it should.
TWO_TOWER_EXTRAS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale",
                    "logit_bias")
LLAVA_MODEL = "LLaVA model"  # a whole model: its errors are split by component
_SHOWN_KEYS = 3  # keys named per component in an error: enough to recognise the problem
_LOAD_FAILURES = ("Error(s) in loading state_dict", "automatic conversion of the weights")


def load_pretrained(cls: Any, path: str, what: str, remedy: str = RESTORE,
                    allowed_unexpected: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """`cls.from_pretrained(path)` that never hands back random weights: no weight files, a
    damaged one, or any missing, unexpected or reshaped key is a `WeightsError` naming the
    folder, `what` it is (LLM, vision tower, LLaVA model: then split into its LLM, vision
    tower and projector) and the first keys, and saying what to do (`remedy`).

    transformers itself only raises for a folder without weight files (or a missing shard);
    missing keys it initialises randomly and unexpected ones it drops, with a log line.
    Keys it knows to be absent (tied weights, buffers such as position_ids) it does not
    report; `allowed_unexpected` are key prefixes that may be left out besides.
    """
    from safetensors import SafetensorError

    try:
        with _no_load_report():
            # ignore_mismatched_sizes: reshaped keys come back in the report (else a
            # RuntimeError that only says "look at the above report").
            model, info = cls.from_pretrained(path, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **kwargs)
    except (OSError, SafetensorError) as err:
        damaged = _damaged_file(path) if isinstance(err, SafetensorError) else None
        named = f"{str(damaged)!r} is damaged or truncated: " if damaged else ""
        raise WeightsError(f"{what} {path!r}: its weights could not be loaded "
                           f"({named}{_first_line(err)}); {remedy}") from err
    except RuntimeError as err:
        # transformers raises these two for weights it could not load or convert.
        if not any(sign in str(err) for sign in _LOAD_FAILURES):
            raise
        raise WeightsError(f"{what} {path!r}: its weights do not fit the model "
                           f"({_first_line(err)}); {remedy}") from err
    problems = loading_problems(info, what, allowed_unexpected)
    if problems:
        raise WeightsError(f"{what} {path!r}: its weight files do not match the model "
                           f"({problems}); refusing to fill the gaps with random weights: "
                           f"{remedy}")
    return model


def _damaged_file(path: str) -> Path | None:
    """The first weight file of the folder `path` that safetensors cannot open (its errors
    never name the file)."""
    from safetensors import safe_open

    folder = Path(path)
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(str(file), "pt"):
                pass
        except Exception:  # noqa: BLE001 - safetensors' own error types
            return file
    return None


@contextmanager
def _no_load_report() -> Iterator[None]:
    """Without transformers' multi-line table of missing/unexpected keys: our one-line error
    says the same, and the keys we allow (a CLIP text tower) are no news to the user."""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    report = _DropLoadReport()
    logger.addFilter(report)
    try:
        yield
    finally:
        logger.removeFilter(report)


class _DropLoadReport:
    """A logging filter: every record but the loading report passes."""

    def filter(self, record: Any) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def loading_problems(info: dict[str, Any], what: str,
                     allowed_unexpected: tuple[str, ...] = ()) -> str:
    """transformers' loading report as one line, by component ("" when the load was exact)."""
    found: list[tuple[str, str]] = [("missing", key) for key in info.get("missing_keys") or ()]
    found += [("unexpected", key) for key in info.get("unexpected_keys") or ()
              if not key.startswith(allowed_unexpected)]
    found += [("with another shape", f"{key} {tuple(file)} in the file, {tuple(model)} in the "
               "model") for key, file, model in info.get("mismatched_keys") or ()]
    grouped: dict[str, dict[str, list[str]]] = {}
    for kind, key in sorted(found, key=lambda item: item[1]):
        grouped.setdefault(component_of(key, what), {}).setdefault(kind, []).append(key)
    parts = [f"{component}: " + ", ".join(f"{len(keys)} {kind} ({_first(keys)})"
                                          for kind, keys in kinds.items())
             for component, kinds in grouped.items()]
    errors = [str(message).splitlines()[0] for message in info.get("error_msgs") or ()]
    return "; ".join(parts + errors[:1])


def _first(items: list[str]) -> str:
    more = f", … {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else ""
    return ", ".join(items[:_SHOWN_KEYS]) + more


def component_of(key: str, what: str) -> str:
    """Which part of a LLaVA model a (loaded) key belongs to; `what` for a single part."""
    if what != LLAVA_MODEL:
        return what
    if "vision_tower" in key:
        return "vision tower"
    if "multi_modal_projector" in key or "image_newline" in key:  # newline: LLaVA-NeXT's
        return "projector"
    return "LLM"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


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


def quantization_unavailable() -> str | None:
    """Why bitsandbytes cannot quantize on this machine (not installed, or no backend for its
    devices), or None when it can. bitsandbytes 0.50 has a CPU backend; older ones do not."""
    from transformers.utils import is_bitsandbytes_available

    if not is_bitsandbytes_available():
        return "bitsandbytes is not installed"
    from transformers.integrations import validate_bnb_backend_availability

    if not validate_bnb_backend_availability(raise_exception=False):
        return "the installed bitsandbytes has no backend for this machine's devices"
    return None


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
    model = load_pretrained(AutoModelForImageTextToText, path, LLAVA_MODEL, **kwargs)
    _keep_used_weight_conversions(model)
    if not for_training:
        model.eval()
        model.requires_grad_(False)
    return model

"""What a vision tower is like, read from its config: how many positions it outputs per image
(with or without a CLS token), which features LLaVA selects, and the image processor that
feeds it. A new vision tower needs nothing here but a config transformers knows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cli.data.images import CLIP_MEAN, CLIP_STD
from llava_cli.data.text.tokenizer import IMAGE_TOKEN

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def vision_config_of(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The vision config of a CLIP/SigLIP folder (full two-tower model or vision-only)."""
    from transformers import AutoConfig

    loaded = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    vision = getattr(loaded, "vision_config", None) or loaded
    if not all(hasattr(vision, name) for name in ("image_size", "patch_size",
                                                  "num_hidden_layers")):
        raise ValueError(f"vision_tower {path!r} is a {loaded.model_type!r} model, not a vision "
                         "tower (CLIP, SigLIP or another image encoder with image_size and "
                         "patch_size); point --vision-tower at one")
    return vision


def check_feature_layer(layer: int, vision_config: PretrainedConfig) -> None:
    """The tower has `num_hidden_layers` layers and so that many + 1 hidden states (the
    embeddings first): a layer outside them would fail at the first forward."""
    depth = vision_config.num_hidden_layers
    if not -(depth + 1) <= layer <= depth:
        raise ValueError(f"vision_select_layer {layer}: the vision tower has {depth} layers; "
                         f"choose one from -{depth + 1} to {depth} (LLaVA-1.5: -2)")


def vision_model_class(vision_config: PretrainedConfig) -> Any:
    """The transformers model class of a vision config (CLIPVisionModel, SiglipVisionModel…)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    return MODEL_MAPPING[type(vision_config)]


def tower_positions(vision_config: PretrainedConfig) -> int:
    """Positions the vision tower outputs per image: its patches, plus a CLS token where the
    tower has one.

    Measured, not looked up by model type: the tower is built from its config and run on the
    meta device, which allocates nothing and computes only shapes (CLIP-L/336: 577 in well
    under a second). Built by its constructor, not `_from_config`: under DeepSpeed ZeRO-3 the
    latter would partition the (meta) parameters.
    """
    import copy

    import torch

    model_class = vision_model_class(vision_config)
    size = vision_config.image_size
    channels = getattr(vision_config, "num_channels", 3)
    shapes_only = copy.deepcopy(vision_config)  # eager attention: plain ops, any machine
    shapes_only._attn_implementation = "eager"
    with torch.device("meta"):
        tower = model_class(shapes_only)
        with torch.no_grad():
            output = tower(pixel_values=torch.empty(1, channels, size, size))
    return int(output.last_hidden_state.shape[1])


def has_cls_token(vision_config: PretrainedConfig) -> bool:
    """Whether the tower prepends a CLS position to its patches (CLIP does, SigLIP does not)."""
    per_side = vision_config.image_size // vision_config.patch_size
    return tower_positions(vision_config) > per_side * per_side


def select_strategy(vision_select_feature: str, has_cls: bool) -> str:
    """transformers' `vision_feature_select_strategy` for LLaVA's `mm_vision_select_feature`:
    `default` drops the first position (the CLS token), `full` keeps every position."""
    if not has_cls:
        return "full"  # "default" would drop a real patch, not a CLS token
    return "full" if vision_select_feature == "cls_patch" else "default"


def build_processor(vision_path: str, vision_config: PretrainedConfig, tokenizer: Any,
                    strategy: str, has_cls: bool,
                    pinpoints: list[list[int]] | None = None) -> Any:
    """LlavaProcessor (LlavaNextProcessor with `pinpoints`) whose image-token count agrees
    with the model's image features."""
    from transformers import LlavaNextProcessor, LlavaProcessor

    processor_cls = LlavaNextProcessor if pinpoints else LlavaProcessor
    return processor_cls(
        image_processor=_image_processor(vision_path, vision_config, has_cls, pinpoints),
        tokenizer=tokenizer, patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls), image_token=IMAGE_TOKEN)


# Settings a tower's image processor passes on to LLaVA's (LlavaImageProcessor takes them all).
_IMAGE_SETTINGS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                   "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def match_image_policy(processor: Any, aspect_ratio: str) -> None:
    """Make `processor` prepare images as training does, so that stock transformers, pipelines
    and vLLM (which run the saved processor) see the training pixels: for `pad`, transformers'
    LlavaImageProcessor with `do_pad` (LLaVA's expand2square in the mean colour, then the
    tower's resize and crop); for `square`, no padding. Anyres processors tile by themselves.
    """
    from transformers import LlavaImageProcessorPil

    image_processor = processor.image_processor
    if aspect_ratio == "anyres" or not hasattr(image_processor, "to_dict"):
        return
    wants_pad = aspect_ratio == "pad"
    if wants_pad and not isinstance(image_processor, LlavaImageProcessorPil):
        settings = {k: v for k, v in image_processor.to_dict().items()
                    if k in _IMAGE_SETTINGS and v is not None}
        # LlavaImageProcessor's own defaults crop to 224: a tower that resizes to its size
        # without cropping (SigLIP) must say so, or its 384 px images would come out 224.
        settings["do_center_crop"] = bool(settings.get("do_center_crop"))
        settings.setdefault("crop_size", settings.get("size"))
        processor.image_processor = LlavaImageProcessorPil(do_pad=True, **settings)
    elif bool(getattr(image_processor, "do_pad", False)) != wants_pad:
        image_processor.do_pad = wants_pad


def _image_processor(vision_path: str, vision_config: PretrainedConfig, has_cls: bool,
                     pinpoints: list[list[int]] | None) -> Any:
    from transformers import AutoImageProcessor, CLIPImageProcessorPil, LlavaNextImageProcessorPil

    saved = Path(vision_path) / "preprocessor_config.json"
    if pinpoints:
        # Keep the tower's resize/normalisation settings, add the anyres grid.
        settings = json.loads(saved.read_text()) if saved.is_file() else _default_image(
            vision_config, has_cls)
        keep = ("size", "crop_size", "image_mean", "image_std", "resample", "rescale_factor")
        return LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints,
                                          **{k: settings[k] for k in keep if k in settings})
    if saved.is_file():
        # AutoImageProcessor keeps SigLIP's own resize/normalisation; pil: no torchvision here.
        return AutoImageProcessor.from_pretrained(vision_path, backend="pil")
    return CLIPImageProcessorPil(**_default_image(vision_config, has_cls))


def _default_image(vision_config: PretrainedConfig, has_cls: bool) -> dict[str, Any]:
    """Settings for a tower folder without a preprocessor_config.json: CLIP's normalisation
    for towers with a CLS token, SigLIP's (0.5) for those without."""
    size = vision_config.image_size
    mean, std = (CLIP_MEAN, CLIP_STD) if has_cls else ((0.5,) * 3,) * 2
    return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
            "image_mean": list(mean), "image_std": list(std)}

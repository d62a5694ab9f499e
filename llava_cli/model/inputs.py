"""What a model expects of its inputs, decided once for training, inspection and generation:
how many tokens an image becomes (the one counter), and the sample builder for a run.

Training takes the spec from the model it trains (`input_spec_of`); `inspect-data` from a
tokenizer and, when given, a model folder (`input_spec_from_paths`). Both then build samples
with `sample_builder`, so what inspect shows is by construction what trains.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llava_cli.data.image_paths import image_root
from llava_cli.data.images import CLIP_MEAN
from llava_cli.data.samples import InputSpec, SampleBuilder, TokenCounter
from llava_cli.data.text.tokenizer import IMAGE_TOKEN, add_llava_tokens, load_tokenizer
from llava_cli.model.vision import tower_positions

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from llava_cli.config.run_config import RunConfig

LLAVA_15_IMAGE_TOKENS = 576  # CLIP-L/14 at 336 px, LLaVA-1.5's tower


def image_tokens_per_image(model_config: PretrainedConfig) -> int:
    """Image tokens one image becomes in a fixed-size LLaVA: the positions its vision tower
    outputs (`model.vision.tower_positions`), less the CLS token that the `default` feature
    selection drops. LLaVA-NeXT (anyres) counts depend on each image's size: see
    `image_token_counter`."""
    if getattr(model_config, "image_grid_pinpoints", None):
        raise ValueError("anyres (LLaVA-NeXT): the image-token count depends on the image "
                         "size; use the processor (it inserts the right count per image)")
    drop = int(model_config.vision_feature_select_strategy == "default")
    return tower_positions(model_config.vision_config) - drop


def image_token_counter(model_config: PretrainedConfig, processor: Any) -> TokenCounter:
    """Tokens per image (given its (width, height)): fixed for LLaVA; per image size for
    LLaVA-NeXT, as its processor inserts them."""
    if getattr(model_config, "image_grid_pinpoints", None):
        size = processor.image_processor.size
        crop = size.get("shortest_edge") or size["height"]
        # As LlavaNextProcessor counts when it expands <image>: its _get_number_of_features
        # includes the CLS position that the `default` feature selection then drops.
        drop = int(model_config.vision_feature_select_strategy == "default")

        def count(image_size: tuple[int, int] | None) -> int:
            width, height = image_size or (crop, crop)
            return int(processor._get_number_of_features(height, width, crop, crop)) - drop

        return count
    fixed = image_tokens_per_image(model_config)
    return lambda image_size: fixed


def input_spec_of(model: Any, processor: Any) -> InputSpec:
    """The inputs `model` expects, with `processor`'s tokenizer and image settings."""
    return InputSpec(processor.tokenizer, model.config.image_token_id,
                     image_token_counter(model.config, processor),
                     tuple(processor.image_processor.image_mean), "from the model")


def input_spec_from_paths(tokenizer_path: str, model_path: str | None = None,
                          image_tokens: int | None = None, trust_remote_code: bool = False,
                          anyres_estimate: int | None = None, im_start_end: bool = False
                          ) -> InputSpec:
    """The inputs a model will expect, for looking at data before any model is loaded.

    Precedence for the count: `image_tokens` given > the model folder's config > 576
    (CLIP-L/14-336, LLaVA-1.5), the last one stated in `note`. An anyres (LLaVA-NeXT) folder
    is an error unless `anyres_estimate` says what fixed count to assume instead.
    `im_start_end`: the tokenizer gets `<im_start>`/`<im_end>` as a new model's does.
    """
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    add_llava_tokens(tokenizer, im_start_end)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    folder = Path(model_path) if model_path else None
    mean = _image_mean(folder) if folder else CLIP_MEAN
    if image_tokens is not None:
        count, note = image_tokens, f"{image_tokens} tokens per image (--image-tokens)"
    elif folder is not None and (found := _count_from_folder(folder, anyres_estimate)):
        count, note = found, f"{found} tokens per image (from {folder / 'config.json'})"
    else:
        count, note = LLAVA_15_IMAGE_TOKENS, (
            f"{LLAVA_15_IMAGE_TOKENS} tokens per image (assumed: CLIP-L/14-336 as in "
            "LLaVA-1.5; pass --model or --image-tokens to change)")
    return InputSpec(tokenizer, image_token_id, lambda size: count, mean, note)


def sample_builder(config: RunConfig, spec: InputSpec, held_out: bool = False) -> SampleBuilder:
    """The sample builder of a run: its data options (training or `held_out` records) with
    the model's input spec. Training, `dpo` and `inspect-data` all build theirs here, so
    relative image paths follow `data.image_paths`' one rule: the image folder given for the
    records, else the data file's folder."""
    options = config.data_options(held_out)
    data = (config.eval_data_path or config.data_path) if held_out else config.data_path
    return SampleBuilder(replace(options, image_folder=image_root(options.image_folder, data)),
                         spec)


def _image_mean(folder: Path) -> tuple[float, ...]:
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        return tuple(json.loads(preprocessor.read_text()).get("image_mean", CLIP_MEAN))
    return CLIP_MEAN


def _count_from_folder(folder: Path, anyres_estimate: int | None = None) -> int | None:
    """The per-image token count of a saved LLaVA model folder (None: not a LLaVA model)."""
    config_file = folder / "config.json"
    if not (config_file.is_file() and json.loads(config_file.read_text()).get("vision_config")):
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "image_grid_pinpoints", None):
        if anyres_estimate is not None:
            return anyres_estimate
        raise ValueError(f"{folder} is an anyres (LLaVA-NeXT) model: its image-token count "
                         "depends on each image's size; pass --image-tokens N for a fixed "
                         "estimate")
    return image_tokens_per_image(config)

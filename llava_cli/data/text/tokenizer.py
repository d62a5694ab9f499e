"""Tokenizer set-up shared by every command: `<image>`/pad tokens and image-token counts.

`inspect-data` and training must agree on how many tokens an image becomes; with a model
(or processor) folder we read it from there, otherwise the user states it (`--image-tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


@dataclass
class TextSide:
    """A tokenizer ready for LLaVA data plus how images turn into tokens."""

    tokenizer: Any
    image_token_id: int
    image_tokens: int  # tokens per image for fixed-size vision towers
    image_mean: tuple[float, ...]
    note: str  # where the image-token count came from, shown to the user

    def count_image_tokens(self, size: tuple[int, int] | None) -> int:
        """Tokens for one image (fixed-size towers: independent of the image size)."""
        return self.image_tokens


def add_llava_tokens(tokenizer: Any) -> list[str]:
    """Add `<image>` as a special token and a pad token when missing; return what was added."""
    from tokenizers import AddedToken

    added = []
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)],
                             special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None:
        if PAD_TOKEN not in tokenizer.get_vocab():
            added.append(PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return added


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local folder or hub id (`trust_remote_code` off unless asked)."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers ourselves
    if path == "demo":
        from llava_cli.demo_tokenizer import build_demo_tokenizer

        return build_demo_tokenizer()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def _image_tokens_from_folder(folder: Path) -> tuple[int, tuple[float, ...], str] | None:
    """Read the per-image token count from a saved LLaVA model/processor folder."""
    processor_file, config_file = folder / "processor_config.json", folder / "config.json"
    preprocessor = folder / "preprocessor_config.json"
    mean = CLIP_MEAN
    if preprocessor.is_file():
        mean = tuple(json.loads(preprocessor.read_text()).get("image_mean", CLIP_MEAN))
    if processor_file.is_file():
        data = json.loads(processor_file.read_text())
        if data.get("num_image_tokens"):
            return int(data["num_image_tokens"]), mean, f"{processor_file}"
    if config_file.is_file() and json.loads(config_file.read_text()).get("vision_config"):
        from transformers import AutoConfig

        from llava_cli.model_factory import image_tokens_per_image

        config = AutoConfig.from_pretrained(str(folder))
        if getattr(config, "image_grid_pinpoints", None):
            raise ValueError(f"{folder} is an anyres (LLaVA-NeXT) model: its image-token count "
                             "depends on each image's size; pass --image-tokens N for a fixed "
                             "estimate")
        return image_tokens_per_image(config), mean, f"{config_file} (vision_config)"
    return None


def load_text_side(tokenizer_path: str, model_path: str | None = None,
                   image_tokens: int | None = None, trust_remote_code: bool = False) -> TextSide:
    """Load the tokenizer, add LLaVA tokens, and settle the image-token count.

    Precedence for the count: `image_tokens` given > the model folder's config > 576
    (CLIP-L/14-336, LLaVA-1.5), the last one stated in `note`.
    """
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    add_llava_tokens(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    found = _image_tokens_from_folder(Path(model_path)) if model_path else None
    if image_tokens is not None:
        return TextSide(tokenizer, image_token_id, image_tokens, CLIP_MEAN,
                        f"{image_tokens} tokens per image (--image-tokens)")
    if found:
        count, mean, source = found
        return TextSide(tokenizer, image_token_id, count, mean,
                        f"{count} tokens per image (from {source})")
    return TextSide(tokenizer, image_token_id, 576, CLIP_MEAN,
                    "576 tokens per image (assumed: CLIP-L/14-336 as in LLaVA-1.5; pass "
                    "--model or --image-tokens to change)")

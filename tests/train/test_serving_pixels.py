"""The saved processor gives the pixels training saw: for every aspect-ratio policy, on real
non-square photos (wide, tall, grayscale, RGBA, palette, a 3.9:1 text crop), a training
sample's `pixel_values` equal what stock `AutoProcessor.from_pretrained(output)` makes of the
same file — bit for bit — and, with `pad`, what the original LLaVA's expand2square + CLIP
processing makes (its own output for chelsea_cat.png is in the shared assets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from llava_cli.config.resolve import resolve_config  # noqa: E402
from llava_cli.train.run import run_training  # noqa: E402
from tests.helpers import TINY_LLM  # noqa: E402

PHOTOS = ["extreme_ironing.jpg", "cat_tall_500x666.webp", "camera_grayscale.png",
          "alpaca_rgba.png", "palette_animated.gif", "ocr_crop_104x27.jpg", "chelsea_cat.png"]
HAS_TRANSPARENCY = {"alpaca_rgba.png", "palette_animated.gif"}


def _train(assets: Path, tmp: Path, aspect: str) -> tuple[Path, object]:
    """One pretrain step of a tiny LLaVA on the original code's tiny CLIP tower (real weights,
    224 px), one record per photo; returns the output directory and the training dataset."""
    records = [{"id": name, "image": name, "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a picture"}]}
        for name in PHOTOS]
    data = tmp / "records.json"
    data.write_text(json.dumps(records))
    with pytest.warns(UserWarning, match="RANDOM"):
        result = run_training(resolve_config("pretrain", flags={
            "model_name_or_path": str(TINY_LLM), "tokenizer": "demo", "random_init": True,
            "vision_tower": str(assets / "original-llava" / "tiny-clip"),
            "data_path": str(data), "image_folder": str(assets / "images"),
            "image_aspect_ratio": aspect, "max_steps": 1, "per_device_train_batch_size": 1,
            "dataloader_num_workers": 0, "output_dir": str(tmp / "out")}))
    return result.output_dir, result.trainer.train_dataset


def _original_llava(path: Path, processor) -> np.ndarray:
    """The original `process_images` for `pad`: `.convert("RGB")`, expand2square with the
    processor mean (int of mean × 255), then the CLIP processor (resize, centre crop)."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    fill = tuple(int(x * 255) for x in processor.image_mean)
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    offset = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)
    canvas.paste(image, offset)
    clip = transformers.CLIPImageProcessorPil(**{
        k: getattr(processor, k) for k in ("size", "crop_size", "image_mean", "image_std",
                                           "resample")})
    return clip(images=canvas, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["pad", "square", "anyres"])
def test_saved_processor_gives_the_training_pixels(assets, tmp_path, aspect):
    output, dataset = _train(assets, tmp_path, aspect)
    stock = transformers.AutoProcessor.from_pretrained(output)
    for position, name in enumerate(PHOTOS):
        trained = dataset[position]["pixel_values"]
        served = stock.image_processor(images=Image.open(assets / "images" / name),
                                       return_tensors="pt")["pixel_values"]
        assert served.dtype == trained.dtype and served.shape == trained.shape, name
        assert torch.equal(served, trained), (name, (served - trained).abs().max())
        if aspect == "pad" and name not in HAS_TRANSPARENCY:
            # (with transparency the original dropped the alpha channel unblended; stock
            # transformers and vLLM composite onto white, and so does training here)
            original = _original_llava(assets / "images" / name, stock.image_processor)
            assert np.array_equal(trained[0].numpy(), original), name


def test_pad_equals_the_original_codes_own_pixels(assets, tmp_path):
    _, dataset = _train(assets, tmp_path, "pad")
    reference = np.load(assets / "original-llava" / "reference" / "full.npz")
    assert str(reference["image_aspect_ratio"]) == "pad"
    trained = dataset[PHOTOS.index("chelsea_cat.png")]["pixel_values"][0].numpy()
    assert np.array_equal(trained, reference["pixel_values"])

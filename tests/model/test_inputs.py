"""model.inputs and model.vision: the one image-token counter, vision-tower traits read from the
config, and the one sample-builder factory that training and inspect-data share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from llava_cli.config.resolve import resolve_config  # noqa: E402
from llava_cli.inspect.inspection import demo_data  # noqa: E402
from llava_cli.model.inputs import (  # noqa: E402
    image_token_counter,
    input_spec_from_paths,
    input_spec_of,
    sample_builder,
)
from llava_cli.model.start import load_starting_model  # noqa: E402
from llava_cli.model.vision import has_cls_token, tower_positions  # noqa: E402
from tests.helpers import TINY_LLM, TINY_VISION  # noqa: E402

TOWER = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4}


def test_tower_positions_come_from_the_config_not_the_model_type():
    clip = transformers.CLIPVisionConfig(**TOWER)
    siglip = transformers.SiglipVisionConfig(**TOWER)
    assert (tower_positions(clip), has_cls_token(clip)) == (17, True)  # 16 patches + CLS
    assert (tower_positions(siglip), has_cls_token(siglip)) == (16, False)
    bigger = transformers.CLIPVisionConfig(**{**TOWER, "image_size": 336, "patch_size": 14})
    assert tower_positions(bigger) == 577  # CLIP-L/14-336: LLaVA-1.5's 576 + CLS


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny LLaVA saved the way a finetune output is, and the config to read data with."""
    folder = tmp_path_factory.mktemp("llava")
    records, images = demo_data()
    flags = {"model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
             "tokenizer": "demo", "random_init": True, "data_path": records,
             "image_folder": images}
    with pytest.warns(UserWarning, match="RANDOM"):
        loaded = load_starting_model(resolve_config("finetune", flags=flags))
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    config = resolve_config("inspect-data", flags={
        "data_path": records, "image_folder": images, "model_name_or_path": str(folder)})
    return folder, config


def test_inspect_builds_exactly_the_samples_training_builds(saved_model):
    folder, config = saved_model
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    processor = transformers.AutoProcessor.from_pretrained(folder)
    training = sample_builder(config, input_spec_of(model, processor))
    inspecting = sample_builder(config, input_spec_from_paths(str(folder), str(folder)))
    assert inspecting.count_image_tokens(None) == training.count_image_tokens(None) == 16
    records = json.loads(Path(config.data_path).read_text())
    for position, record in enumerate(records):
        ours, theirs = training.build(record, position), inspecting.build(record, position)
        assert np.array_equal(ours.encoded.ids, theirs.encoded.ids)
        assert np.array_equal(ours.encoded.label_ids, theirs.encoded.label_ids)
        assert [im.tobytes() for im in ours.images] == [im.tobytes() for im in theirs.images]
    # The count is what the model's processor inserts for an image, too.
    batch = processor(images=ours.images[:1] or None, text="<image>hi", return_tensors="pt")
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == \
        image_token_counter(model.config, processor)(None)


def test_anyres_counter_equals_what_the_processor_inserts():
    from PIL import Image

    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(**TOWER), image_grid_pinpoints=pinpoints,
        text_config=transformers.LlamaConfig(vocab_size=600, hidden_size=64,
                                             num_hidden_layers=1, num_attention_heads=4))
    processor = transformers.LlavaNextProcessor(
        image_processor=transformers.LlavaNextImageProcessorPil(
            image_grid_pinpoints=pinpoints, size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32}),
        tokenizer=build_demo_tokenizer(), patch_size=8, num_additional_image_tokens=1,
        vision_feature_select_strategy="default", image_token="<image>")
    count = image_token_counter(config, processor)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for size in [(570, 380), (500, 666), (14, 25), (104, 27), (32, 32)]:
        batch = processor(images=Image.new("RGB", size), text="<image>hi", return_tensors="pt")
        assert int((batch["input_ids"] == image_id).sum()) == count(size), size


def test_pad_keeps_a_siglip_towers_size(assets):
    """SigLIP resizes to 384 × 384 without cropping; LLaVA's processor would crop to 224 by
    default. The pad processor saved for it must give the tower's size."""
    from PIL import Image

    from llava_cli.model.vision import match_image_policy

    tower = transformers.AutoImageProcessor.from_pretrained(
        assets / "configs" / "siglip-so400m-patch14-384", backend="pil")
    processor = transformers.LlavaProcessor(image_processor=tower,
                                            tokenizer=build_tokenizer(), patch_size=14)
    match_image_policy(processor, "pad")
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    pixels = processor.image_processor(images=Image.new("RGB", (500, 300)),
                                       return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 384, 384)


def build_tokenizer():
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer

    return build_demo_tokenizer()

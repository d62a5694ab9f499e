"""model.start: where a run starts. Settings that cannot apply to the starting model are
refused (never ignored and then written to the manifest as applied), a pretrain output made
from a LLaVA checkpoint continues, a bf16 run loads its weights in bf16, and saved configs
describe the model as it is."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llava_cli.config.resolve import resolve_config  # noqa: E402
from llava_cli.inspect.inspection import demo_data  # noqa: E402
from llava_cli.model.start import load_starting_model  # noqa: E402
from llava_cli.train.run import run_training  # noqa: E402
from tests.helpers import TINY_LLM, TINY_VISION  # noqa: E402

RECORDS, IMAGES = demo_data()
DATA = {"data_path": RECORDS, "image_folder": IMAGES, "max_steps": 1,
        "per_device_train_batch_size": 2, "dataloader_num_workers": 0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny LLaVA checkpoint, saved as any finetune output is."""
    folder = tmp_path_factory.mktemp("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_starting_model(resolve_config("finetune", flags={
            "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
            "tokenizer": "demo", "random_init": True}))
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("flags", "message"), [
    ({"vision_tower": str(TINY_VISION)}, "vision_tower: .* already has its vision tower"),
    ({"projector_type": "linear"}, "projector_type linear: .* cannot apply"),
    ({"vision_select_layer": -1}, "vision_select_layer -1: the starting model uses layer -2"),
    ({"image_aspect_ratio": "anyres"}, "'anyres' needs a LLaVA-NeXT model"),
])
def test_settings_that_cannot_apply_to_a_checkpoint_are_refused(checkpoint, tmp_path, flags,
                                                                message):
    config = resolve_config("finetune", flags={
        "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "out"), **DATA,
        **flags})
    with pytest.raises(ValueError, match=message):
        run_training(config)
    assert not (tmp_path / "out" / "llava_run.json").exists()


def test_pretrain_from_a_checkpoint_then_finetune(checkpoint, tmp_path):
    pretrain = run_training(resolve_config("pretrain", flags={
        "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "pre"),
        "skip_bad_records": True, **DATA}))
    manifest = json.loads((pretrain.output_dir / "llava_run.json").read_text())
    assert manifest["base"]["path"] == str(checkpoint.resolve())
    finetune = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(pretrain.output_dir), "output_dir": str(tmp_path / "ft"),
        **DATA}))
    trained = transformers.LlavaForConditionalGeneration.from_pretrained(finetune.output_dir)
    projector = pretrain.trainer.model.model.multi_modal_projector.linear_1.weight
    assert trained.model.multi_modal_projector.linear_1.weight.shape == projector.shape


def test_a_bf16_run_loads_its_weights_in_bf16(checkpoint, tmp_path):
    result = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "bf16"),
        "bf16": True, **DATA}))
    assert next(result.trainer.model.parameters()).dtype == torch.bfloat16
    kept = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "fp32"),
        "bf16": True, "torch_dtype": "float32", **DATA}))
    assert next(kept.trainer.model.parameters()).dtype == torch.float32


def test_saved_config_counts_the_image_tokens_the_processor_inserts(checkpoint, tmp_path):
    from PIL import Image

    result = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(checkpoint), "output_dir": str(tmp_path / "out"), **DATA}))
    saved = transformers.AutoConfig.from_pretrained(result.output_dir)
    processor = transformers.AutoProcessor.from_pretrained(result.output_dir)
    batch = processor(images=Image.new("RGB", (40, 30)), text="<image>", return_tensors="pt")
    inserted = int((batch["input_ids"] == saved.image_token_id).sum())
    assert saved.image_seq_length == inserted == 16  # not LLaVA-1.5's 576


def test_an_anyres_checkpoint_finetunes(tmp_path):
    """The data check before the model loads estimates an anyres model's image tokens
    (only errors count there) instead of refusing the LLaVA-NeXT folder."""
    folder = tmp_path / "next"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_starting_model(resolve_config("finetune", flags={
            "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
            "tokenizer": "demo", "random_init": True, "image_aspect_ratio": "anyres"}))
    loaded.model.save_pretrained(folder)
    loaded.processor.save_pretrained(folder)
    result = run_training(resolve_config("finetune", flags={
        "model_name_or_path": str(folder), "image_aspect_ratio": "anyres",
        "output_dir": str(tmp_path / "out"), **DATA}))
    assert type(result.trainer.model).__name__ == "LlavaNextForConditionalGeneration"

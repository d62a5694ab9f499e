"""Fixtures of the safety suite: a real saved LLaVA checkpoint (pretrain from random init,
then a short finetune, written by our own command line) and tools to snapshot folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_cli.config.resolve import resolve_config
from llava_cli.inspect.inspection import demo_data
from llava_cli.train.run import run_training
from tests.helpers import PLAIN_SCHEDULE, TINY_LLM, TINY_VISION

RECORDS, IMAGES = demo_data()


@pytest.fixture(scope="session")
def llava_checkpoint(tmp_path_factory) -> Path:
    """A full LLaVA checkpoint as `finetune` writes it (weights loaded with from_pretrained)."""
    runs = tmp_path_factory.mktemp("safety-runs")
    common = {"data_path": RECORDS, "image_folder": IMAGES, "per_device_train_batch_size": 2,
              "seed": 7, "save_steps": 100, "dataloader_num_workers": 0, **PLAIN_SCHEDULE}
    pretrain = resolve_config("pretrain", flags={
        **common, "output_dir": str(runs / "pretrain"), "model_name_or_path": str(TINY_LLM),
        "vision_tower": str(TINY_VISION), "tokenizer": "demo", "random_init": True,
        "skip_bad_records": True, "max_steps": 2})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        run_training(pretrain)
    finetune = resolve_config("finetune", flags={
        **common, "output_dir": str(runs / "finetune"), "max_steps": 2,
        "model_name_or_path": str(runs / "pretrain")})
    return run_training(finetune).output_dir


@pytest.fixture(scope="session")
def demo_builder(tmp_path_factory):
    """A sample builder with the demo tokenizer and an image folder holding one real image."""
    from PIL import Image

    from llava_cli.data.samples import DataOptions, InputSpec, SampleBuilder
    from llava_cli.data.text.demo_tokenizer import build_demo_tokenizer
    from llava_cli.data.text.tokenizer import add_llava_tokens

    folder = tmp_path_factory.mktemp("fuzz-images")
    Image.new("RGB", (40, 24), (200, 10, 10)).save(folder / "a.png")
    tokenizer = build_demo_tokenizer()
    add_llava_tokens(tokenizer)
    spec = InputSpec(tokenizer, tokenizer.convert_tokens_to_ids("<image>"), lambda size: 4,
                     (0.5, 0.5, 0.5))
    return SampleBuilder(DataOptions(template="v1", image_folder=str(folder)), spec)

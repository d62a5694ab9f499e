"""The frozen-tower feature cache changes the cost, never the training: the same loss and
gradients cold, warm and without it (stage 1, stage 2 full and LoRA), a second run that never
runs the tower and ends with the same weights, no entry shared with another tower or processor
setting, damaged entries recomputed, refusals where it cannot be exact, and the CLI flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from llava_cli.cli import app
from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import ConfigError
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.parts import components
from llava_cli.model.start import load_starting_model
from llava_cli.model.vision import match_image_policy
from llava_cli.train.arguments import to_training_arguments
from llava_cli.train.feature_cache import feature_cache_for, image_key
from llava_cli.train.run import prepare_model, run_training
from llava_cli.train.stages import supervised
from llava_cli.train.trainer import LlavaTrainer
from tests.helpers import TINY_LLM, TINY_VISION

RECORDS, IMAGES = demo_data()  # the images are 96×80: not square
STAGES = {"pretrain": ("pretrain", {}), "finetune": ("finetune", {}),
          "lora": ("lora", {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0}),
          "finetune padding-free": ("finetune", {"padding_free": True}),
          # packs of several samples a row, 2 rows a batch: features in the packs' order
          "finetune packed": ("finetune", {"packing": "on", "packing_budget": 200,
                                           "per_device_train_batch_size": 2})}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    """A tiny random LLaVA saved with save_pretrained: every run below reloads it."""
    out = tmp_path_factory.mktemp("tiny") / "llava"
    config = resolve_config("finetune", flags={
        "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
        "tokenizer": "demo", "random_init": True, "output_dir": str(out / "unused")})
    transformers.set_seed(3)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        loaded = load_starting_model(config)
    loaded.model.save_pretrained(out)
    loaded.processor.save_pretrained(out)
    return out


def _config(stage: str, llava: Path, out: Path, cache: Path | None, **keys: Any):
    command, stage_keys = STAGES[stage]
    flags = {"model_name_or_path": str(llava), "data_path": RECORDS, "image_folder": IMAGES,
             "output_dir": str(out), "overwrite": True, "skip_bad_records": True,
             "per_device_train_batch_size": 4, "dataloader_num_workers": 0, "seed": 5,
             "vision_feature_cache": str(cache) if cache else None, **stage_keys, **keys}
    return resolve_config(command, flags=flags)


def _trainer(stage: str, llava: Path, tmp: Path, cache: Path | None, **keys: Any):
    """A LlavaTrainer set up as `run_training` sets it up, and one batch of its data."""
    config = _config(stage, llava, tmp / "out", cache, **keys)
    args = to_training_arguments(config, str(tmp / "out"))
    transformers.set_seed(0)
    loaded = load_starting_model(config)
    model, _ = prepare_model(config, loaded.model, args)
    match_image_policy(loaded.processor, config.image_aspect_ratio)
    lengths = supervised.check_data(config)  # what packing packs by
    dataset, _ = supervised.datasets(config, model, loaded.processor, lengths)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=dataset,
                           data_collator=supervised.collator(config, loaded.processor),
                           processing_class=loaded.processor)
    trainer.model.train()
    return trainer, _batch(trainer)


def _batch(trainer) -> dict[str, Any]:
    batch = dict(next(iter(trainer.get_train_dataloader())))
    batch.pop("dropped_records", None)
    batch.pop("record_errors", None)
    assert batch["pixel_values"].shape[0] >= 2
    return batch


def _loss_and_grads(trainer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in
                           trainer.model.named_parameters() if param.grad is not None}


def _assert_same(a, b) -> None:
    assert a[0].item() == pytest.approx(b[0].item(), abs=1e-6)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("stage", list(STAGES))
def test_cold_warm_and_no_cache_give_the_same_loss_and_gradients(llava_dir, tmp_path, stage):
    trainer, batch = _trainer(stage, llava_dir, tmp_path, tmp_path / "cache")
    if stage == "finetune packed":  # more samples than rows: several a row
        assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]
    cache, images = trainer.feature_cache, batch["pixel_values"].shape[0]
    cold = _loss_and_grads(trainer, batch)
    assert (cache.hits, cache.misses) == (0, images)
    warm = _loss_and_grads(trainer, batch)
    assert (cache.hits, cache.misses) == (images, images)
    trainer.feature_cache = None
    plain = _loss_and_grads(trainer, batch)
    assert any("multi_modal_projector" in name for name in plain[1])
    assert not any("vision_tower" in name for name in plain[1])
    if stage != "pretrain":  # the LLM trains (in full or its LoRA weights) and gets gradients
        assert any("language_model" in name for name in plain[1])
    _assert_same(cold, plain)
    _assert_same(warm, plain)


class _TowerCalls:
    """A stand-in reporter whose callback counts the vision tower's forward calls."""

    enabled = False

    def __init__(self) -> None:
        self.calls = 0

    def summary(self, *args: Any, **kwargs: Any) -> None:
        pass

    def callback(self) -> TrainerCallback:
        counter = self

        class Count(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                components(model).vision_tower.register_forward_hook(counter.count)

        return Count()

    def count(self, *args: Any) -> None:
        self.calls += 1


def _run(llava: Path, out: Path, cache: Path | None, **keys: Any):
    reporter = _TowerCalls()
    config = _config("pretrain", llava, out, cache, per_device_train_batch_size=2,
                     num_train_epochs=2, **keys)
    result = run_training(config, reporter)
    return result, reporter.calls, load_file(str(out / "projector.safetensors"))


def test_a_second_run_reuses_the_cache_and_ends_with_the_same_weights(llava_dir, tmp_path):
    cache = tmp_path / "cache"
    plain, plain_calls, plain_weights = _run(llava_dir, tmp_path / "plain", None)
    cold, cold_calls, cold_weights = _run(llava_dir, tmp_path / "cold", cache)
    warm, warm_calls, warm_weights = _run(llava_dir, tmp_path / "warm", cache)
    assert plain_calls > 0 and "vision_feature_cache_hits" not in plain.metrics
    # the cold run computes the images of its first epoch; its second epoch reads them back
    assert cold_calls > 0 and cold.metrics["vision_feature_cache_misses"] > 0
    assert cold.metrics["vision_feature_cache_hits"] > 0
    assert len(_entries(cache)) == 3  # the demo's three images, each stored once
    assert warm_calls == 0 and warm.metrics["vision_feature_cache_misses"] == 0
    assert warm.metrics["vision_feature_cache_hits"] == (
        cold.metrics["vision_feature_cache_hits"] + cold.metrics["vision_feature_cache_misses"])
    for weights in (cold_weights, warm_weights):
        assert weights.keys() == plain_weights.keys()
        for name, tensor in plain_weights.items():
            torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=1e-6)
    assert plain.metrics["train_loss"] == pytest.approx(warm.metrics["train_loss"], abs=1e-6)
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave nothing behind


def _entries(cache: Path) -> set[Path]:
    return set(cache.rglob("*.safetensors"))


def _keys(batch) -> list[str]:
    """The cache key of each image in the batch (the demo batches repeat images)."""
    return [image_key(pixels) for pixels in batch["pixel_values"]]


def test_another_tower_or_processor_setting_never_hits(llava_dir, tmp_path):
    cache = tmp_path / "cache"
    first, batch = _trainer("finetune", llava_dir, tmp_path / "a", cache)
    _loss_and_grads(first, batch)
    written = _entries(cache)
    assert len(written) == len(set(_keys(batch)))

    def misses_all(trainer, batch) -> None:
        _loss_and_grads(trainer, batch)
        assert trainer.feature_cache.hits == 0
        assert trainer.feature_cache.misses == batch["pixel_values"].shape[0]

    square, square_batch = _trainer("finetune", llava_dir, tmp_path / "b", cache,
                                    image_aspect_ratio="square")  # pad above
    assert not torch.equal(square_batch["pixel_values"], batch["pixel_values"])
    misses_all(square, square_batch)
    other_mean, _ = _trainer("finetune", llava_dir, tmp_path / "c", cache)
    other_mean.processing_class.image_processor.image_mean = [0.2, 0.3, 0.4]
    misses_all(other_mean, _batch(other_mean))
    other_weights, batch = _trainer("finetune", llava_dir, tmp_path / "d", cache)
    with torch.no_grad():
        components(other_weights.model).vision_tower.post_layernorm.weight.add_(1e-3)
    misses_all(other_weights, batch)  # (even a weight the selected layer never reads)
    other_layer, batch = _trainer("finetune", llava_dir, tmp_path / "e", cache)
    other_layer.model.config.vision_feature_layer = -1
    misses_all(other_layer, batch)
    assert len(list(cache.glob("*/tower.json"))) == 3  # one folder per tower set-up
    assert written < _entries(cache)


def test_a_damaged_entry_is_computed_again(llava_dir, tmp_path):
    cache = tmp_path / "cache"
    trainer, batch = _trainer("pretrain", llava_dir, tmp_path, cache)
    cold = _loss_and_grads(trainer, batch)
    truncated, garbage = sorted(_entries(cache))[:2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage.write_bytes(b"not a safetensors file")
    again = _loss_and_grads(trainer, batch)
    images = len(_keys(batch))
    damaged = sum(key in (truncated.stem, garbage.stem) for key in _keys(batch))
    assert damaged >= 2
    assert (trainer.feature_cache.hits, trainer.feature_cache.misses) == (
        images - damaged, images + damaged)
    _assert_same(again, cold)
    assert load_file(str(truncated))["features"].ndim == 2  # overwritten, whole again
    _loss_and_grads(trainer, batch)
    assert trainer.feature_cache.misses == images + damaged  # all hits now


@pytest.mark.parametrize(("keys", "message"), [
    ({"train_vision_tower": "full"}, "train_vision_tower is 'full'"),
    ({"train_vision_tower": "last_1_layers"}, "freeze the tower"),
    ({"image_aspect_ratio": "anyres"}, "not supported yet with image_aspect_ratio anyres"),
])
def test_refused_where_it_cannot_be_exact(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("finetune", flags={"vision_feature_cache": str(tmp_path), **keys})
    resolve_config("finetune", flags=keys)  # fine without the cache


def test_refused_under_zero3_and_for_a_tower_with_dropout(llava_dir, tmp_path):
    zero3 = tmp_path / "zero3.json"
    zero3.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="not supported under DeepSpeed ZeRO-3"):
        resolve_config("finetune", flags={"vision_feature_cache": str(tmp_path),
                                          "deepspeed": str(zero3)})
    trainer, _ = _trainer("pretrain", llava_dir, tmp_path, tmp_path / "cache")
    components(trainer.model).vision_tower.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        feature_cache_for(trainer.model, trainer.args)


def test_the_cli_flag_end_to_end_with_dataloader_workers(llava_dir, tmp_path):
    def pretrain(out: str) -> dict[str, Any]:
        result = CliRunner().invoke(app, [
            "pretrain", "--model-name-or-path", str(llava_dir), "--data-path", RECORDS,
            "--image-folder", IMAGES, "--skip-bad-records", "--max-steps", "3",
            "--batch-size", "2", "--dataloader-num-workers", "2", "-o", str(tmp_path / out),
            "--vision-feature-cache", str(tmp_path / "cache")])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "train_results.json").read_text())

    first, second = pretrain("first"), pretrain("second")
    assert first["vision_feature_cache_misses"] > 0
    assert second["vision_feature_cache_misses"] == 0 and second["vision_feature_cache_hits"] > 0
    assert first["train_loss"] == second["train_loss"]
    saved = json.loads(next((tmp_path / "cache").glob("*/tower.json")).read_text())
    assert saved["vision_feature_layer"] == -2 and saved["tower_class"] == "CLIPVisionModel"
    config = (tmp_path / "second" / "llava_config.yaml").read_text()
    assert f"vision_feature_cache: {tmp_path / 'cache'}" in config

"""Cross-sample packing changes the cost, never the training: a step of packs gives the loss
and gradients of the same samples padded (sdpa and eager, images and text-only records, LoRA,
the Trainer's normalisation for gradient accumulation), and whole runs from a saved model —
packed and the same packs padded — log the same losses and end with the same weights, resume
mid-run included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml

from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import RunConfig
from llava_cli.data.batching.collator import DataCollator
from llava_cli.inspect.inspection import demo_data
from llava_cli.train.run import run_training
from tests.helpers import TINY_LLM, TINY_VISION, lever_samples
from tests.helpers import assert_same_loss_and_grads as _assert_same
from tests.helpers import lever_sample as _sample
from tests.helpers import loss_and_grads as _loss_and_grads
from tests.helpers import tiny_llava as _tiny_llava

SAMPLES = lever_samples()

RECORDS, IMAGES = demo_data()
MORE = [_sample([30, 31], [50, 51, 52, 53, 54], False, 3),
        _sample([32, 33, 34], [55], True, 4)]


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    """The tiny LLaVA written with save_pretrained, for from_pretrained per attention."""
    path = tmp_path_factory.mktemp("packing-model") / "llava"
    _tiny_llava().save_pretrained(path)
    return path


def _reloaded(path: Path, attn: str):
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        path, attn_implementation=attn)
    return model.train()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_per_pack_give_the_padded_loss_and_gradients(saved_llava, attn):
    model = _reloaded(saved_llava, attn)
    packs = [SAMPLES[:2], [SAMPLES[2], *MORE]]  # images and text-only in one pack
    rows = DataCollator(pad_token_id=0, pack_rows=True)(packs)
    padded = DataCollator(pad_token_id=0)(packs)
    assert rows["input_ids"].shape[0] == 2 and padded["input_ids"].shape[0] == 5
    torch.testing.assert_close(rows["pixel_values"], padded["pixel_values"])
    reference = _loss_and_grads(model, padded, supervised=False)
    _assert_same(reference, _loss_and_grads(model, rows, supervised=False))
    _assert_same(reference, _loss_and_grads(model, rows, supervised=True))


def test_accumulated_packs_normalise_as_the_padded_steps(saved_llava):
    """Two micro-batches with the Trainer's num_items_in_batch: sum of both ÷ all items."""
    model = _reloaded(saved_llava, "sdpa")
    micro = [[SAMPLES[:2]], [[SAMPLES[2], *MORE]]]
    items = torch.tensor(sum(int((s["labels"] != -100).sum()) for s in [*SAMPLES, *MORE]))

    def accumulated(pack_rows: bool):
        total, grads = 0.0, {}
        for packs in micro:
            batch = DataCollator(pad_token_id=0, pack_rows=pack_rows)(packs)
            loss, step = _loss_and_grads(model, batch, supervised=True, num_items=items)
            total += loss
            for name, grad in step.items():
                grads[name] = grads.get(name, 0) + grad
        return total, grads

    _assert_same(accumulated(False), accumulated(True))


def test_lora_gradients_are_the_same_packed(saved_llava):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_reloaded(saved_llava, "sdpa"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        init_lora_weights=False))
    packs = [SAMPLES, MORE]
    padded = _loss_and_grads(model, DataCollator(pad_token_id=0)(packs), supervised=True)
    rows = _loss_and_grads(model, DataCollator(pad_token_id=0, pack_rows=True)(packs),
                           supervised=True)
    assert any("lora_" in name for name in padded[1])
    _assert_same(padded, rows)


# --- whole runs from a saved model -----------------------------------------------------------

def _flags(out: Path, base: Path, **keys) -> dict:
    return {"data_path": RECORDS, "image_folder": IMAGES, "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2, "overwrite": True, "learning_rate": 1e-2,
            "seed": 3, "max_steps": 4, "logging_steps": 1, "save_steps": 2,
            "model_name_or_path": str(base), "skip_bad_records": True, "packing": "on",
            "packing_budget": 160, "dataloader_num_workers": 1, "output_dir": str(out), **keys}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny LLaVA trained for one step and saved: the runs below load it from disk."""
    root = tmp_path_factory.mktemp("packing-base")
    config = resolve_config("finetune", flags={
        "data_path": RECORDS, "image_folder": IMAGES, "max_steps": 1, "seed": 1,
        "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
        "tokenizer": "demo", "random_init": True, "skip_bad_records": True,
        "output_dir": str(root / "base")})
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return run_training(config).output_dir


def _losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def _assert_same_weights(a, b, tolerance: float = 2e-4) -> None:
    trained = a.trainer.model.state_dict()
    for key, value in b.trainer.model.state_dict().items():
        difference = (trained[key] - value).norm() / value.norm().clamp_min(1e-12)
        assert difference < tolerance, f"{key} differs by {difference:.2e}"


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("packing-runs")
    return {layout: run_training(resolve_config("finetune", flags=_flags(
        root / layout, base, packing_layout=layout))) for layout in ("packed", "padded")}


def test_packed_run_equals_the_same_packs_padded(runs):
    packed, padded = runs["packed"], runs["padded"]
    assert len(_losses(packed.output_dir)) == 4
    assert _losses(packed.output_dir) == pytest.approx(_losses(padded.output_dir), rel=1e-4)
    _assert_same_weights(packed, padded)
    dataset = packed.trainer.train_dataset
    assert dataset.records == len(dataset.index) and len(dataset) < dataset.records
    saved = yaml.safe_load((packed.output_dir / "llava_config.yaml").read_text())
    assert saved["packing"] == "on" and saved["packing_budget"] == 160
    assert packed.metrics["samples_per_row"] == round(dataset.records / len(dataset), 3)


def test_batches_hold_packed_rows_within_the_budget(runs):
    trainer = runs["packed"].trainer
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2  # per_device_train_batch_size counts rows
    assert "attention_mask" not in batch
    starts = (batch["position_ids"] == 0).sum(dim=1)
    assert (starts > 1).any()  # several samples (or a padding block) in a row


def test_resuming_mid_run_continues_the_same_packed_order(base, runs, tmp_path):
    out = tmp_path / "resumed"
    first = resolve_config("finetune", flags=_flags(out, base, max_steps=4, save_steps=2))
    run_training(first)
    (out / "checkpoint-4").rename(out / "gone")  # keep step 2 only, as after a kill
    import shutil

    shutil.rmtree(out / "gone")
    resumed = run_training(resolve_config("finetune", flags={
        **_flags(out, base), "overwrite": False, "resume": "latest"}))
    assert _losses(resumed.output_dir)[-2:] == pytest.approx(
        _losses(runs["packed"].output_dir)[-2:], rel=1e-4)
    _assert_same_weights(resumed, runs["packed"])


def test_lora_run_trains_the_same_packed(base, tmp_path):
    # Without LoRA dropout: its masks are drawn per element, so rows of other shapes draw
    # other masks (equal in distribution, not in value).
    results = {layout: run_training(resolve_config("lora", flags=_flags(
        tmp_path / layout, base, packing_layout=layout, save_strategy="no", save_steps=None,
        dataloader_num_workers=0, lora_dropout=0.0))) for layout in ("packed", "padded")}
    assert _losses(results["packed"].output_dir) == pytest.approx(
        _losses(results["padded"].output_dir), rel=1e-4)


def test_packing_needs_a_packing_aware_attention():
    with pytest.raises(ValueError, match="packing needs an attention"):
        RunConfig(packing="on", attn_implementation="paged_attention")


def test_auto_packs_only_where_measured_faster():
    # On CPU packing was measured slower at the default budget (bench/RESULTS.md, "Packing").
    on, why = RunConfig(packing="auto", attn_implementation="sdpa").packing_choice
    assert not on and why.startswith("auto: not measured faster with sdpa")
    assert RunConfig(packing="on").packing_choice == (True, "packing on")
    assert RunConfig(packing="off").packing_choice == (False, "packing off")


def test_grouped_by_modality_packs_hold_one_modality_and_train(base, tmp_path):
    from llava_cli.data.batching.sampler import ModalityLengthGroupedSampler

    result = run_training(resolve_config("finetune", flags=_flags(
        tmp_path / "grouped", base, group_by_modality_length=True, max_steps=1,
        save_strategy="no", save_steps=None, dataloader_num_workers=0)))
    trainer = result.trainer
    dataset = trainer.train_dataset
    has_image = dataset.index.has_image
    for k in range(len(dataset)):
        assert len(set(has_image[dataset.packs.members(k)].tolist())) == 1
    assert isinstance(trainer._get_train_sampler(), ModalityLengthGroupedSampler)
    assert (dataset.modality_lengths < 0).any() == (~has_image).any()

"""The speed levers change the cost, never the training: supervised-only logits, padding-free
batches and a frozen tower without backward give the plain path's losses and gradients."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_cli.config.resolve import resolve_config
from llava_cli.config.run_config import ConfigError, RunConfig
from llava_cli.data.batching.collator import DataCollator
from llava_cli.inspect.inspection import demo_data
from llava_cli.model.parts import components
from llava_cli.train.arguments import to_training_arguments
from llava_cli.train.run import run_training
from llava_cli.train.supervised_loss import (
    shifted_cross_entropy,
    supervised_cross_entropy,
    supervised_positions,
    supervised_targets,
)
from tests import helpers
from tests.helpers import TINY_LLM, TINY_VISION

IMAGE, IMAGE_TOKENS = helpers.IMAGE, helpers.IMAGE_TOKENS
_tiny_llava = helpers.tiny_llava
_sample = helpers.lever_sample
SAMPLES = helpers.lever_samples()
_loss_and_grads = helpers.loss_and_grads
_assert_same = helpers.assert_same_loss_and_grads


def test_supervised_positions_and_targets_are_the_shifted_labels():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert supervised_positions(labels).tolist() == [[False, True, True, False, False],
                                                     [True, False, False, True, False]]
    assert supervised_targets(labels).tolist() == [5, 6, 7, 8]


def test_supervised_logits_give_the_plain_loss_and_gradients():
    model = _tiny_llava()
    batch = DataCollator(pad_token_id=0)(SAMPLES)
    _assert_same(_loss_and_grads(model, batch, supervised=False),
                 _loss_and_grads(model, batch, supervised=True))
    # The Trainer's normalisation for gradient accumulation / token averaging: sum ÷ N.
    _assert_same(_loss_and_grads(model, batch, supervised=False, num_items=torch.tensor(25)),
                 _loss_and_grads(model, batch, supervised=True, num_items=torch.tensor(25)))


def test_label_smoothing_is_the_trainers_formula_on_shifted_labels():
    from transformers.trainer_pt_utils import LabelSmoother

    model = _tiny_llava().eval()
    batch = DataCollator(pad_token_id=0)(SAMPLES)
    labels = batch.pop("labels")
    with torch.no_grad():
        full = model(**batch)
        kept = model(**batch, logits_to_keep=supervised_positions(labels))
    for items in (None, torch.tensor(25)):
        expected = LabelSmoother(epsilon=0.1)(full, labels, shift_labels=True,
                                              num_items_in_batch=items)
        torch.testing.assert_close(
            supervised_cross_entropy(kept, labels, items, label_smoothing=0.1), expected)
        torch.testing.assert_close(  # the plain path (lever off) with smoothing
            shifted_cross_entropy(full, labels, items, label_smoothing=0.1), expected)
    assert not torch.allclose(supervised_cross_entropy(kept, labels), expected)


def test_supervised_loss_refuses_full_logits():
    model = _tiny_llava()
    batch = DataCollator(pad_token_id=0)(SAMPLES)
    labels = batch.pop("labels")
    with pytest.raises(ValueError, match="logits_to_keep=supervised_positions"):
        supervised_cross_entropy(model(**batch), labels)


def test_padding_free_batch_is_one_row_with_restarting_positions():
    a = {"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}
    b = {"input_ids": [1, 7], "labels": [9, 7]}  # a supervised first label gets masked
    batch = DataCollator(pad_token_id=0, padding_free=True)([a, b])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in batch and "pixel_values" not in batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(attn):
    model = _tiny_llava(attn)
    padded = DataCollator(pad_token_id=0)(SAMPLES)
    packed = DataCollator(pad_token_id=0, padding_free=True)(SAMPLES)
    assert packed["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in SAMPLES))
    torch.testing.assert_close(packed["pixel_values"], padded["pixel_values"])
    reference = _loss_and_grads(model, padded, supervised=False)
    _assert_same(reference, _loss_and_grads(model, packed, supervised=False))
    _assert_same(reference, _loss_and_grads(model, packed, supervised=True))


def test_padding_free_needs_a_packing_aware_attention():
    with pytest.raises(ValueError, match="padding_free needs an attention"):
        RunConfig(padding_free=True, attn_implementation="paged_attention")


def test_liger_kernel_is_refused_on_cpu_with_the_alternative(tmp_path):
    config = resolve_config("finetune", flags={"use_liger_kernel": True})
    with pytest.raises(ValueError, match="use_liger_kernel needs a CUDA GPU"):
        to_training_arguments(config, str(tmp_path))


def test_training_arguments_for_checkpointing_and_workers(tmp_path):
    config = resolve_config("finetune", flags={"gradient_checkpointing": True,
                                               "dataloader_num_workers": 2})
    args = to_training_arguments(config, str(tmp_path))
    assert args.activation_checkpointing
    assert args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert args.dataloader_persistent_workers and not args.dataloader_pin_memory
    with pytest.raises(ConfigError, match="unknown configuration key 'padding_fre'"):
        resolve_config("finetune", flags={"padding_fre": True})


# --- whole runs: same trajectory with every lever on or off -----------------------------------

RECORDS, IMAGES = demo_data()
LEVERS_OFF = {"supervised_logits_only": False, "skip_frozen_backward": False,
              "padding_free": False}


def _run(out: Path, stage: str = "finetune", **keys):
    flags = {"data_path": RECORDS, "image_folder": IMAGES, "per_device_train_batch_size": 2,
             "overwrite": True, "learning_rate": 1e-2, "seed": 3, "max_steps": 3,
             "logging_steps": 1, "save_strategy": "no", "gradient_checkpointing": True,
             "model_name_or_path": str(TINY_LLM), "vision_tower": str(TINY_VISION),
             "tokenizer": "demo", "random_init": True, "skip_bad_records": True,
             "output_dir": str(out), **keys}
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return run_training(resolve_config(stage, flags=flags))


def _losses(result) -> list[float]:
    state = json.loads((result.output_dir / "trainer_state.json").read_text())
    return [row["loss"] for row in state["log_history"] if "loss" in row]


def _tower_output_requires_grad(result) -> bool:
    """Whether a training-mode forward builds a backward graph through the vision tower."""
    model = result.trainer.model.train()
    seen = []
    tower = components(model).vision_tower
    handle = tower.register_forward_hook(lambda m, i, o: seen.append(o[0].requires_grad))
    batch = next(iter(result.trainer.get_train_dataloader()))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    model(**batch)
    handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    return {"off": _run(root / "off", **LEVERS_OFF),
            "on": _run(root / "on"),
            # without checkpointing (which turns the KV cache off by itself): the packed run
            # must not depend on it
            "packed": _run(root / "packed", padding_free=True, gradient_checkpointing=False)}


def test_levers_keep_the_loss_trajectory_and_the_weights(runs):
    reference = _losses(runs["off"])
    assert len(reference) == 3
    for name in ("on", "packed"):
        assert _losses(runs[name]) == pytest.approx(reference, rel=1e-4), name
        trained = runs[name].trainer.model.state_dict()
        for key, value in runs["off"].trainer.model.state_dict().items():
            # Relative to the tensor: Adam turns float noise in a near-zero gradient into a
            # full-size step for that one element, so elementwise tolerances would be flaky.
            difference = (trained[key] - value).norm() / value.norm().clamp_min(1e-12)
            assert difference < 2e-4, f"{name}: {key} differs by {difference:.2e}"


def test_label_smoothing_trains_the_same_with_the_lever_on_or_off(tmp_path):
    """transformers' own smoother does not shift LLaVA's labels (the lever-off path used it);
    with the lever on, the Trainer's smoothing was skipped altogether."""
    smooth = {"label_smoothing_factor": 0.1, "max_steps": 2}
    off = _losses(_run(tmp_path / "off", **LEVERS_OFF, **smooth))
    on = _losses(_run(tmp_path / "on", **smooth))
    plain = _losses(_run(tmp_path / "plain", max_steps=2))
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-4, atol=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(on, plain, strict=True))


def test_frozen_tower_costs_no_backward_only_with_the_lever(runs):
    assert _tower_output_requires_grad(runs["off"])  # transformers' hook: a useless graph
    assert not _tower_output_requires_grad(runs["on"])


@pytest.mark.parametrize("bits", [16, 4])
def test_frozen_tower_costs_no_backward_under_lora(tmp_path, bits):
    result = _run(tmp_path / "lora", stage="lora", lora_r=4, lora_alpha=8, bits=bits)
    assert not _tower_output_requires_grad(result)
    lora_b = [p for n, p in result.trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA still learned


def test_cli_flag_and_set_switch_the_levers():
    from typer.testing import CliRunner

    from llava_cli.cli import app

    result = CliRunner().invoke(app, ["finetune", "--padding-free", "--set",
                                      "supervised_logits_only=false", "--print-config"])
    assert result.exit_code == 0, result.output
    assert "padding_free: true" in result.output
    assert "supervised_logits_only: false" in result.output
    assert "skip_frozen_backward: true" in result.output


@pytest.mark.parametrize(("cores", "processes", "workers"),
                         [(2, 1, 1), (2, 2, 0), (16, 2, 4), (64, 8, 4), (1, 1, 0)])
def test_default_workers_leave_each_training_process_a_core(monkeypatch, tmp_path, cores,
                                                            processes, workers):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    args = to_training_arguments(resolve_config("finetune"), str(tmp_path))
    assert args.dataloader_num_workers == workers
    assert args.dataloader_persistent_workers == (workers > 0)

"""Feature-cache entries are checked against what the tower makes: an entry of another shape
or dtype (planted, or written by a different set-up under the same key) is damaged, computed
again and overwritten, with one warning; the training is the one without it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_cli.train.feature_cache import SHAPE_FILE
from tests.train.test_feature_cache import (  # the tiny LLaVA and the trainer set-up
    _assert_same,
    _entries,
    _keys,
    _loss_and_grads,
    _run,
    _trainer,
    llava_dir,  # noqa: F401 - a fixture
)


def _plant(entry: Path, tensor: torch.Tensor) -> None:
    """Overwrite a cache entry with `tensor` under the entry's own key (a well-formed file)."""
    save_file({"features": tensor}, str(entry), metadata={"key": entry.stem})


def _variants(good: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"shape": good[:-1].clone(), "dtype": good.to(torch.float64)}


def test_entries_of_another_shape_or_dtype_are_computed_again(
        llava_dir, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    trainer, batch = _trainer("pretrain", llava_dir, tmp_path, cache)
    cold = _loss_and_grads(trainer, batch)
    good = {entry: load_file(str(entry))["features"] for entry in _entries(cache)}
    shape_entry, dtype_entry = sorted(good)[:2]
    _plant(shape_entry, _variants(good[shape_entry])["shape"])
    _plant(dtype_entry, _variants(good[dtype_entry])["dtype"])
    with pytest.warns(UserWarning) as caught:
        again = _loss_and_grads(trainer, batch)
    messages = [str(w.message) for w in caught if "vision_feature_cache" in str(w.message)]
    assert len(messages) == 1, messages  # said once, for both entries
    assert "are treated as damaged and computed again" in messages[0]
    _assert_same(again, cold)
    images = len(_keys(batch))
    planted = sum(key in (shape_entry.stem, dtype_entry.stem) for key in _keys(batch))
    assert planted >= 2 and trainer.feature_cache.misses == images + planted
    for entry in (shape_entry, dtype_entry):  # overwritten with the tower's own features
        torch.testing.assert_close(load_file(str(entry))["features"], good[entry], atol=0, rtol=0)


def test_a_run_on_a_planted_cache_trains_as_a_clean_one(llava_dir, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    cold, _, cold_weights = _run(llava_dir, tmp_path / "cold", cache)
    shapes = list(cache.glob(f"*/{SHAPE_FILE}"))
    assert len(shapes) == 1
    recorded = json.loads(shapes[0].read_text())
    for entry, kind in zip(sorted(_entries(cache)), ("shape", "dtype"), strict=False):
        good = load_file(str(entry))["features"]
        assert list(good.shape) == recorded["shape"] and str(good.dtype) == recorded["dtype"]
        _plant(entry, _variants(good)[kind])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warm, calls, warm_weights = _run(llava_dir, tmp_path / "warm", cache)
    assert sum("vision_feature_cache: entry" in str(w.message) for w in caught) == 1
    assert calls > 0 and warm.metrics["vision_feature_cache_misses"] == 2
    for name, tensor in cold_weights.items():
        torch.testing.assert_close(warm_weights[name], tensor, atol=1e-6, rtol=1e-6)

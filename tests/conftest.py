"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread OpenMP is 15-100x slower on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep record-index caches out of the user's ~/.cache.
os.environ.setdefault("LLAVA_CLI_CACHE", tempfile.mkdtemp(prefix="llava-cli-test-cache-"))
ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"
# Config-only tiny LLM (Llama, hidden 64, 2 layers) and CLIP vision tower (32 px, patch 8),
# shipped with the tiny recipes; tests build them with random_init.
TINY_LLM = ROOT / "recipes" / "tiny" / "llm"
TINY_VISION = ROOT / "recipes" / "tiny" / "vision"


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets`: real tokenizers, images and LLaVA records (CI always has them)."""
    if not SHARED_ASSETS.is_dir():
        pytest.skip(f"shared test assets not found at {SHARED_ASSETS} (a fresh clone without "
                    "../shared); CI provides them")
    return SHARED_ASSETS


@pytest.fixture(scope="session")
def golden(assets: Path) -> Path:
    """`assets/golden`: reference ids/labels produced by the original LLaVA code."""
    return assets / "golden"


def load_tokenizer(path: Path):
    """A tokenizer from a local folder, never the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


PROBE_TEXT = "USER: <image>\nWhat color is the shape? ASSISTANT: red"


def probe_batch(processor):
    """A one-image probe batch (red picture + a v1 prompt) to compare models' logits on."""
    from PIL import Image

    return processor(images=Image.new("RGB", (40, 30), (220, 40, 40)), text=PROBE_TEXT,
                     return_tensors="pt")


def eval_logits(model, batch):
    """The model's logits on `batch`, in eval mode without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        return model(**batch).logits

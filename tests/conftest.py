"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED_ASSETS = ROOT.parent / "shared" / "assets"


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

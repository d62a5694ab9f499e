"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent).
Helpers that are not fixtures live in `tests/helpers.py`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import SHARED_ASSETS

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread OpenMP is 15-100x slower on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep record-index caches out of the user's ~/.cache.
os.environ.setdefault("LLAVA_CLI_CACHE", tempfile.mkdtemp(prefix="llava-cli-test-cache-"))


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

"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent).
Helpers that are not fixtures live in `tests/helpers.py`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import require_assets

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread OpenMP is 15-100x slower on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep record-index caches out of the user's ~/.cache.
os.environ.setdefault("LLAVA_CLI_CACHE", tempfile.mkdtemp(prefix="llava-cli-test-cache-"))


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets`: real tokenizers, images and LLaVA records (CI always has them); every
    test that needs them asks for this fixture, and is skipped with the reason without them."""
    return require_assets()


@pytest.fixture(scope="session")
def golden(assets: Path) -> Path:
    """`assets/golden`: reference ids/labels produced by the original LLaVA code."""
    return assets / "golden"

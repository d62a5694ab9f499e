"""Shared fixtures: the real assets in ../shared (skipped with a reason when absent).
Helpers that are not fixtures live in `tests/helpers.py`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import finetuned_base, require_assets, tiny_runs

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-thread OpenMP is 15-100x slower on 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep record-index caches out of the user's ~/.cache.
os.environ.setdefault("LLAVA_CLI_CACHE", tempfile.mkdtemp(prefix="llava-cli-test-cache-"))


def pytest_collection_modifyitems(config, items) -> None:
    """With LLAVA_TEST_SHARED_USERS=1, only the tests that use the shared assets (the `assets` or
    `golden` fixture, or a module calling `require_assets`/`golden_folder`): CI runs them with
    LLAVA_TEST_SHARED pointing nowhere, to prove a plain clone skips them rather than fails."""
    if os.environ.get("LLAVA_TEST_SHARED_USERS") != "1":
        return
    sources: dict[str, str] = {}

    def uses_shared(item) -> bool:
        if {"assets", "golden"} & set(getattr(item, "fixturenames", ())):
            return True
        path = str(item.path)
        if path not in sources:
            sources[path] = Path(path).read_text()
        return "require_assets(" in sources[path] or "golden_folder(" in sources[path]

    keep = [item for item in items if uses_shared(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


@pytest.fixture(scope="session")
def assets() -> Path:
    """`../shared/assets`: real tokenizers, images and LLaVA records (CI always has them); every
    test that needs them asks for this fixture, and is skipped with the reason without them."""
    return require_assets()


@pytest.fixture(scope="session")
def golden(assets: Path) -> Path:
    """`assets/golden`: reference ids/labels produced by the original LLaVA code."""
    return assets / "golden"


# --- tiny trained models, built once per session (tests that change one copy it first) --------


@pytest.fixture(scope="session")
def tiny_pretrain_finetune(tmp_path_factory) -> dict[str, Path]:
    """`tests.helpers.tiny_runs`: a tiny random-init pretrain → finetune (2 steps each, 4 shape
    pictures per stage), {"pretrain": output, "finetune": output}. Read-only for tests."""
    return tiny_runs(tmp_path_factory.mktemp("tiny-runs"))


@pytest.fixture(scope="session")
def tiny_finetune(tiny_pretrain_finetune) -> Path:
    """The finetune output of `tiny_pretrain_finetune` (a trained checkpoint on disk)."""
    return tiny_pretrain_finetune["finetune"]


@pytest.fixture(scope="session")
def finetuned_base_dir(tmp_path_factory) -> Path:
    """`tests.helpers.finetuned_base`'s saved output: the start of the 2-process runs (slow
    tests of tests/train). Read-only for tests."""
    root = tmp_path_factory.mktemp("finetuned-base")
    finetuned_base(root)
    return root / "base"

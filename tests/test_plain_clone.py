"""A plain clone (no ../shared beside the repository) passes: tests reach the shared assets only
through the `assets` fixture or `tests.helpers.require_assets`, which skip with the reason."""

from __future__ import annotations

import re

from tests.helpers import ROOT, require_assets, shared_assets

# A path built to the shared folder by hand: `… / "shared"`, `"../shared/…"`, SHARED_ASSETS.
BY_HAND = re.compile(r"""/\s*["']shared["']|["']\.\./shared|SHARED_ASSETS""")


def test_no_test_module_builds_the_shared_path_itself():
    offenders = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").rglob("*.py"))
                 if path.name not in ("helpers.py", "test_plain_clone.py")
                 and BY_HAND.search(path.read_text())]
    assert offenders == [], f"use the `assets` fixture or require_assets(): {offenders}"


def test_the_override_names_the_shared_folder_and_skips_without_it(monkeypatch, tmp_path):
    import pytest

    monkeypatch.setenv("LLAVA_TEST_SHARED", str(tmp_path / "nowhere"))
    assert shared_assets() == tmp_path / "nowhere" / "assets"
    with pytest.raises(pytest.skip.Exception, match="shared test assets not found at .*nowhere"):
        require_assets()
    (tmp_path / "nowhere" / "assets").mkdir(parents=True)
    assert require_assets() == tmp_path / "nowhere" / "assets"

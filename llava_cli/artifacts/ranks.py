"""Which process of a launched run writes: rank 0 (or the only one, without a launcher).

Outputs, the manifest, the base's fingerprint, notes and warnings are the writing process's
alone; every other rank takes part in the collective work and stays quiet.
"""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / deepspeed set RANK), or a run without a launcher."""
    return os.environ.get("RANK", "0").strip() in ("0", "")

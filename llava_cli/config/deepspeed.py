"""What a DeepSpeed config means for a run, checked before anything is built.

Each refusal names the conflict and what to change: these combinations would otherwise fail deep
inside DeepSpeed, or worse, train silently without what was asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_deepspeed_config(deepspeed: Any) -> dict[str, Any] | None:
    """A DeepSpeed config given as a JSON path or a dict, read; None without one."""
    if not deepspeed:
        return None
    if isinstance(deepspeed, str):
        path = Path(deepspeed)
        if not path.is_file():
            raise ValueError(f"deepspeed config {deepspeed!r} not found")
        return json.loads(path.read_text())
    return dict(deepspeed)


def deepspeed_stage(deepspeed: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed config (a JSON path or a dict), None without one."""
    config = read_deepspeed_config(deepspeed)
    return None if config is None else int(config.get("zero_optimization", {}).get("stage", 0))


def refuse_incompatible_deepspeed(deepspeed: Any, bits: int,
                                  component_rates: dict[str, float | None]) -> None:
    """Raise ValueError for a DeepSpeed config that cannot do what the run asks.

    `component_rates`: the per-component learning rates that are set (e.g. projector_lr).
    """
    config = read_deepspeed_config(deepspeed)
    if config is None:
        return
    if bits != 16 and deepspeed_stage(config) == 3:
        raise ValueError("QLoRA (bits 4/8) cannot run under DeepSpeed ZeRO-3: bitsandbytes "
                         "weights cannot be partitioned. Use ZeRO-2 "
                         "(recipes/deepspeed/zero2.json), DDP, or one GPU")
    rates = [name for name, rate in component_rates.items() if rate]
    sections = [name for name in ("optimizer", "scheduler") if name in config]
    if rates and sections:
        # DeepSpeed's optimizer gets the trainable parameters as one flat group, and its
        # schedulers broadcast one rate (warmup_max_lr, from learning_rate) to every group:
        # either way the components' rates would be lost without a word.
        named = " and ".join(f'"{name}"' for name in sections)
        raise ValueError(
            f"{' and '.join(rates)} cannot apply: the DeepSpeed config {deepspeed!r} defines "
            f"{named}, and DeepSpeed's optimizer takes all parameters as one group, its "
            "schedulers give every group one learning rate. Remove the section(s): the "
            "Trainer's optimizer and lr_scheduler_type schedule are used and keep each "
            f"component's rate. Or unset {' / '.join(rates)}")

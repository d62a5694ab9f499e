"""Reading and writing weights that DeepSpeed ZeRO-3 has partitioned across ranks.

Under ZeRO-3 a parameter holds only this rank's shard (its local shape is (0,) or flat), so
`load_state_dict`, `reset_parameters` or `state_dict()` on it silently read or write nothing
(LLaVA's "projector lost under ZeRO-3" and "trained from random weights" bugs). Everything here
is a no-op wrapper without ZeRO-3, and collective with it: call it on every rank.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any


def is_partitioned(module: Any) -> bool:
    """Whether any parameter of `module` is a ZeRO-3 partitioned one."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module: Any, modify: bool = False) -> Any:
    """Context in which a module's partitioned parameters are whole on every rank; with
    `modify`, what rank 0 writes is what every rank keeps when it ends."""
    return gathered_parameters(list(module.parameters()), modify)


def gathered_parameters(params: list[Any], modify: bool = False) -> Any:
    """`gathered` for a list of parameters (a no-op when none is partitioned)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


def copy_weights(target: Any, source: Any, what: str) -> None:
    """`target.load_state_dict(source.state_dict())`, strictly, for partitioned modules too:
    one parameter pair at a time is gathered and copied (memory: one tensor, not the model).
    `what` names the part in errors."""
    import torch

    if not (is_partitioned(target) or is_partitioned(source)):
        with torch.no_grad():
            target.load_state_dict(source.state_dict())
        return
    ours, theirs = dict(target.named_parameters()), dict(source.named_parameters())
    if set(ours) != set(theirs):
        missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise ValueError(f"{what}: the loaded weights do not fit the model (missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]})")
    for name, param in ours.items():
        with gathered_parameters([param, theirs[name]], modify=True), torch.no_grad():
            if param.shape != theirs[name].shape:
                raise ValueError(f"{what}: {name} has shape {tuple(theirs[name].shape)}, the "
                                 f"model needs {tuple(param.shape)}")
            param.copy_(theirs[name])
    with torch.no_grad():  # buffers are never partitioned
        for name, buffer in source.named_buffers():
            target.get_buffer(name).copy_(buffer)

"""The training process's distributed set-up and its end: what must happen to the environment
before the Trainer's arguments exist, after they do, and when the run is over."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def prepare_environment(deepspeed: Any) -> None:
    """Before the Trainer's arguments are built. DeepSpeed without a launcher looks for MPI;
    give it a one-process world instead (a free local port, rank 0 of 1)."""
    import socket

    if not deepspeed or "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def start_deepspeed_comm(args: Any) -> None:
    """After the Trainer's arguments are built. With `use_cpu`, accelerate starts
    torch.distributed itself and deepspeed.comm stays uninitialised, so ZeRO-3's zero.Init
    would see a world of 1 (a batch-size assertion); start it on the same (gloo) group."""
    if not (args.deepspeed and args.use_cpu):
        return
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


@contextmanager
def process_group_closed_at_end() -> Iterator[None]:
    """Destroy the torch.distributed process group (if the run made one) when the block ends.

    The Trainer (and DeepSpeed) create the group but never destroy it. A gloo group left to
    interpreter shutdown can abort the process (SIGABRT, "terminate called without an active
    exception": gloo worker threads release tensors after Python is gone; pytorch#190489), so a
    successful multi-process run would exit -6 now and then. Whoever owns the process calls this.
    """
    try:
        yield
    finally:
        import gc

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # Objects in reference cycles (the Trainer, its DDP model and reducer) keep the
            # group's backend alive past destroy_process_group; collected now, its gloo
            # threads are joined here, while the interpreter is whole.
            gc.collect()
            dist.destroy_process_group()
            gc.collect()

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


def choose_cpu_threads(hidden_size: int, workers: int) -> str:
    """On a CPU run, the intra-op thread count this process computes with, and why (for the
    run summary). With OMP_NUM_THREADS set (or a GPU) it is left as it is. Otherwise torch's
    default (every core, per process) oversubscribes small machines — measured 11x slower on
    2 cores with dataloader workers — so each candidate from 1 to this process's share of the
    cores (less its dataloader workers) is timed on a matmul of the model's width, and the
    fastest kept."""
    import time

    import torch

    if torch.cuda.is_available():
        return f"{torch.get_num_threads()} (GPU run)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // processes - workers)
    width = max(64, min(hidden_size, 2048))
    left = torch.randn(256, width)
    right = torch.randn(width, 4 * width)

    def seconds(threads: int) -> float:
        torch.set_num_threads(threads)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(left, right)
            best = min(best, time.perf_counter() - start)
        return best

    candidates = sorted({1, max(1, share // 2), share})
    timed = {threads: seconds(threads) for threads in candidates}
    chosen = min(timed, key=timed.__getitem__)
    torch.set_num_threads(chosen)
    return (f"{chosen} of {cores} cores (measured fastest of {', '.join(map(str, candidates))}"
            f" at width {hidden_size}, {processes} process(es), {workers} dataloader "
            "worker(s); set OMP_NUM_THREADS to choose)")

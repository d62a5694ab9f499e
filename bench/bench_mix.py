"""Benchmark a data mix (`MixIndex`) against the plain record index of one file: build and
open time, and the memory one dataloader worker keeps.

Usage: ``python bench/bench_mix.py NAME=PATH [NAME=PATH ...] [--reads 2000]``; each PATH is
a data path `open_records` takes (a LLaVA file or a mix file). The first is the baseline the
ratios are against.

Every measurement runs in a fresh Python process (as `bench_index.py` does). Steps:

* ``build``: index every source with an empty cache dir;
* ``open``: the index again, from the cache (what training does on every start);
* ``worker (fresh)``: open from cache, then N random reads: the VmRSS it keeps is what a
  spawned dataloader worker keeps;
* ``worker (forked)``: a parent opens the index, forks a worker that does N random reads;
  the worker's private memory (USS, from smaps_rollup) is what each forked dataloader worker
  adds, since the index's pages stay shared with the parent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _status_mb(field: str, pid: str = "self") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _private_mb() -> float:
    """This process's private memory (USS): what it does not share with its parent."""
    total = 0
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def _reads(index: Any, reads: int) -> float:
    rng = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(reads):
        record = index.read(rng.randrange(len(index)))
        assert record["conversations"]
    return (time.perf_counter() - t0) / reads * 1e6


def child(step: str, path: str, cache: str, reads: int) -> dict[str, Any]:
    """One step, in this fresh process."""
    import numpy  # noqa: F401 - counted in every row, as the loader imports it

    from llava_cli.data.sources.mix import open_records

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    index = open_records(path, cache_dir=cache)
    out["open_seconds"] = time.perf_counter() - t0
    out["records"] = len(index)
    if step == "worker (fresh)":
        out["us_per_read"] = _reads(index, reads)
    elif step == "worker (forked)":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: read, then report its own memory
            os.close(r)
            figures = {"us_per_read": _reads(index, reads), "uss_mb": _private_mb(),
                       "rss_mb": _status_mb("VmRSS")}
            os.write(w, json.dumps(figures).encode())
            os._exit(0)
        os.close(w)
        data = b""
        while chunk := os.read(r, 1 << 16):
            data += chunk
        os.waitpid(pid, 0)
        worker = json.loads(data)
        out.update(us_per_read=worker["us_per_read"], worker_uss_mb=worker["uss_mb"],
                   worker_rss_mb=worker["rss_mb"])
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["rss_mb"] = _status_mb("VmRSS")
    return out


def run_child(step: str, path: str, cache: str, reads: int) -> dict[str, Any]:
    """`step` measured in a fresh interpreter."""
    paths = [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    cmd = [sys.executable, os.path.abspath(__file__), f"x={path}", "--child", step,
           "--cache", cache, "--reads", str(reads)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


STEPS = ("build", "open", "worker (fresh)", "worker (forked)")


def measure(path: str, reads: int) -> dict[str, dict[str, Any]]:
    """Every step for one data path, with its own cache dir (built by the first step)."""
    cache = tempfile.mkdtemp(prefix="bench-mix-")
    try:
        return {step: run_child(step, path, cache, reads) for step in STEPS}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per data path, ratios against the first."""
    base = next(iter(results.values()))
    lines = ["| data | records | build s | open s | fresh worker RSS MB | forked worker "
             "USS MB | µs/read | records × | open × | fresh RSS × | forked USS × |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        def ratio(step: str, key: str, row: dict = r) -> str:
            return f"{row[step][key] / base[step][key]:.2f}"
        lines.append(
            f"| {name} | {r['build']['records']:,} | {r['build']['open_seconds']:.2f} | "
            f"{r['open']['open_seconds']:.3f} | {r['worker (fresh)']['rss_mb']:.0f} | "
            f"{r['worker (forked)']['worker_uss_mb']:.1f} | "
            f"{r['worker (fresh)']['us_per_read']:.0f} | "
            f"{r['build']['records'] / base['build']['records']:.1f} | "
            f"{ratio('open', 'open_seconds')} | {ratio('worker (fresh)', 'rss_mb')} | "
            f"{ratio('worker (forked)', 'worker_uss_mb')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", help="NAME=PATH, the baseline first")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.data]
    if args.child:
        print(json.dumps(child(args.child, pairs[0][1], args.cache, args.reads)))
        return
    from bench_index import machine

    print(f"machine: {machine()}\n", file=sys.stderr)
    results = {}
    for name, path in pairs:
        results[name] = measure(path, args.reads)
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    print(table(results))


if __name__ == "__main__":
    main()

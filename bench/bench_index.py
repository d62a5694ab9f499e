"""Benchmark :class:`llava_cli.data.records.RecordIndex` against LLaVA's ``json.load``.

Usage: ``python bench/bench_index.py FILE [--repeats 3] [--reads 2000] [--skip-json]``

Every measurement runs in a fresh Python process. Peak RSS is the child's VmHWM (which
``ru_maxrss`` also reports, except that Linux carries the parent's RSS at fork time into
the child's ``ru_maxrss``; the parent stays small, so both agree). Times cover the operation
only, not interpreter start-up; RSS includes the interpreter and numpy (the "bare" row).
Steps:

* ``json.load``: what LLaVA does in every dataloader worker;
* ``build``: index the file with an empty cache dir (scan + write the .npz);
* ``open (cached)``: load the index from that cache;
* ``worker``: open from cache, then read N random records, like one dataloader worker;
  its RSS afterwards (VmRSS) is what each worker keeps.

The file is read once up front so every step starts with it in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(step: str, path: str, cache: str, reads: int) -> dict[str, Any]:
    """Run one step in this (fresh) process and return its measurements."""
    import numpy  # count numpy in every row's RSS, as the loader imports it

    from llava_cli.data.records import RecordIndex

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if step == "json.load":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        out["records"] = len(data)
        out["text_only"] = sum("image" not in r for r in data)
    elif step == "build":
        index = RecordIndex.open(path, cache_dir=cache)
        assert not index.from_cache
        out["records"], out["text_only"] = len(index), int((~index.has_image).sum())
    elif step == "open (cached)":
        index = RecordIndex.open(path, cache_dir=cache)
        assert index.from_cache
        out["records"] = len(index)
    elif step == "worker":
        index = RecordIndex.open(path, cache_dir=cache)
        rng = random.Random(0)
        t1 = time.perf_counter()
        n_turns = sum(len(index.read(rng.randrange(len(index)))["conversations"])
                      for _ in range(reads))
        out["us_per_read"] = (time.perf_counter() - t1) / reads * 1e6
        out["turns"] = n_turns
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _status_mb("VmHWM")
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_mb"] = _status_mb("VmRSS")
    out["numpy"] = numpy.__version__
    return out


def run_child(step: str, path: str, cache: str, reads: int) -> dict[str, Any]:
    """Measure ``step`` in a fresh interpreter."""
    paths = [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    cmd = [sys.executable, os.path.abspath(__file__), path, "--child", step, "--cache", cache,
           "--reads", str(reads)]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine() -> str:
    """One line about the machine this ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except (OSError, StopIteration):
        mem = float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python "
            f"{platform.python_version()}, {platform.system()}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each index step (best kept)")
    ap.add_argument("--reads", type=int, default=2000)
    ap.add_argument("--skip-json", action="store_true", help="skip the slow json.load baseline")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.file, args.cache, args.reads)))
        return

    path = os.path.abspath(args.file)
    size = os.path.getsize(path)
    with open(path, "rb") as f:  # warm the page cache; small reads keep this process small
        while f.read(1 << 20):
            pass
    rows: dict[str, dict[str, Any]] = {}
    rows["bare (python + numpy)"] = run_child("bare", path, "", 0)
    print(f"file: {path}, {size / 1e9:.3f} GB\nmachine: {machine()}, numpy "
          f"{rows['bare (python + numpy)']['numpy']}\n", file=sys.stderr)
    if not args.skip_json:
        rows["json.load"] = run_child("json.load", path, "", 0)
        print(f"json.load: {rows['json.load']}", file=sys.stderr)
    cache = ""
    for step in ("build", "open (cached)", "worker"):
        best: dict[str, Any] | None = None
        for _ in range(args.repeats):
            if step == "build":  # a fresh, empty cache dir each time; the last one is kept
                shutil.rmtree(cache, ignore_errors=True) if cache else None
                cache = tempfile.mkdtemp(prefix="bench-index-")
            r = run_child(step, path, cache, args.reads)
            best = r if best is None or r["seconds"] < best["seconds"] else best
        rows[step] = best
        print(f"{step}: {best}", file=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)
    print(table(rows, args.reads))


def table(rows: dict[str, dict[str, Any]], reads: int) -> str:
    """Markdown table with ratios against json.load."""
    base = rows.get("json.load")
    lines = ["| step | seconds | peak RSS MB | RSS after MB | time vs json.load | "
             "memory vs json.load |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        tr = mr = "-"
        if base and name in ("build", "open (cached)"):
            tr = f"{base['seconds'] / r['seconds']:.0f}x faster"
            mr = f"{base['peak_rss_mb'] / r['peak_rss_mb']:.0f}x lower peak"
        elif base and name == "worker":  # what each worker keeps for the whole run
            mr = f"{base['rss_mb'] / r['rss_mb']:.0f}x lower RSS kept"
        label = f"worker ({reads} random reads)" if name == "worker" else name
        lines.append(f"| {label} | {r['seconds']:.3f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_mb']:.0f} | {tr} | {mr} |")
    if "worker" in rows:
        lines.append(f"\nworker: {rows['worker']['us_per_read']:.0f} us per read")
    for name in ("json.load", "build"):
        if name in rows and "records" in rows[name]:
            lines.append(f"{name}: {rows[name]['records']} records, "
                         f"{rows[name]['text_only']} text-only")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Benchmark `llava inspect-data --check` on a mix665k-shaped file: records/s and peak memory.

    python bench/make_mix665k.py /tmp/mix665k.json
    python bench/bench_check.py /tmp/mix665k.json --images /tmp/mix665k_images

`--images` builds (once) an image tree holding every path the file references, as hard links
to one small JPEG (symlinks: hard links hit ext4's 65,000-link limit), so header checks open
real files. Peak memory is sampled from /proc every
0.2 s over the whole process tree (main process + workers), summed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

DEFAULT_TOKENIZER = (Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizers"
                     / "llama2-vicuna-v1.5")


def build_image_tree(data: Path, folder: Path) -> int:
    """Link one small JPEG at every image path `data` references; return how many."""
    from llava_cli.data.records import RecordIndex

    folder.mkdir(parents=True, exist_ok=True)
    seed = folder / "_seed.jpg"
    if not seed.exists():
        Image.new("RGB", (640, 480), (120, 80, 40)).save(seed, quality=80)
    index = RecordIndex.open(data)
    made = 0
    for position in range(len(index)):
        image = index.read(position).get("image")
        for relative in image if isinstance(image, list) else [image] if image else []:
            target = folder / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(seed, target)
                made += 1
    return made


def tree_rss_kb(root: int, proportional: bool = False) -> int:
    """Resident memory of `root` and all its descendants, in kB.

    `proportional` counts PSS instead of RSS: pages shared between processes (a forked
    dataloader worker shares torch and the model with its parent) are split between them
    instead of counted once per process.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        children.setdefault(int(fields["PPid"]), []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _memory_kb(pid, "Pss" if proportional else "VmRSS")
        stack += children.get(pid, [])
    return total


def _memory_kb(pid: int, field: str) -> int:
    source = "smaps_rollup" if field == "Pss" else "status"
    try:
        text = Path(f"/proc/{pid}/{source}").read_text()
    except OSError:  # the process ended meanwhile
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# The same CLI with the chunk cache switched off: every record through the tokenizers
# library's own encode (the path before the cache; a bench-only patch, not a product option).
PLAIN_TOKENIZER = ("import sys; from llava_cli import cli; "
                   "from llava_cli.data.text import chunked_tokenizer as c; "
                   "c.ChunkedEncoder.for_tokenizer = staticmethod(lambda tokenizer: None); "
                   "sys.argv[0] = 'llava'; cli.main()")


def run_check(data: Path, images: Path, tokenizer: Path, workers: int,
              plain_tokenizer: bool = False) -> dict:
    """Run the CLI once; return wall time, peak tree RSS and the report."""
    launcher = ["-c", PLAIN_TOKENIZER] if plain_tokenizer else ["-m", "llava_cli"]
    command = [sys.executable, *launcher, "inspect-data", str(data), "--tokenizer",
               str(tokenizer), "--image-folder", str(images), "--check", "--format", "json",
               "--workers", str(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_kb(process.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - start
    output = process.stdout.read() if process.stdout else ""
    report = json.loads(output[output.index("{"):])
    return {"wall_s": wall, "peak_tree_rss_mb": peak / 1024, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--baseline", action="store_true",
                        help="also run with the chunk cache off, in the same session")
    args = parser.parse_args()
    started = time.perf_counter()
    made = build_image_tree(args.data, args.images)
    print(f"image tree: {made} new links in {time.perf_counter() - started:.0f} s")
    runs = {"chunk cache (default)": False, "library encode": True} if args.baseline \
        else {"chunk cache (default)": False}
    rates = {}
    for name, plain in runs.items():
        result = run_check(args.data, args.images, args.tokenizer, args.workers, plain)
        report = result["report"]
        rates[name] = report["records"] / result["wall_s"]
        print(f"--- {name}")
        print(f"records            {report['records']}")
        print(f"wall               {result['wall_s']:.1f} s (start-up included)")
        print(f"records/s          {rates[name]:.0f}")
        print(f"peak RSS (tree)    {result['peak_tree_rss_mb']:.0f} MB")
        print(f"problems           {report['problems']}")
        print(f"lengths            {report['length_tokens']}")
    if len(rates) == 2:
        ratio = rates["chunk cache (default)"] / rates["library encode"]
        print(f"chunk cache vs library encode: {ratio:.2f}x")


if __name__ == "__main__":
    main()

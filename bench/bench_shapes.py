"""How fast `llava demo` makes its pictures: `generate_split` against the floor of writing the
same number of PNGs of their mean size with Pillow alone (no drawing, no records), both measured
in this run, this process.

Usage: ``python bench/bench_shapes.py [--images 2000] [--repeats 3]``. Prints seconds (best of
the repeats) and the ratio; the test suite only checks what is written, never how fast.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _best(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(prefix="bench-shapes-"))
        try:
            start = time.perf_counter()
            run(folder)
            times.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(folder)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from PIL import Image

    from llava_cli.demo.shapes import MAX_SIDE, MIN_SIDE, generate_split

    def pillow_floor(folder: Path) -> None:
        side = (MIN_SIDE + MAX_SIDE) // 2  # the pictures' mean side
        blank = Image.new("RGB", (side, side), (128, 128, 128))
        for i in range(args.images):
            blank.save(folder / f"{i:05d}.png")

    floor = _best(pillow_floor, args.repeats)
    split = _best(lambda folder: generate_split(folder / "split", args.images, 1, "finetune"),
                  args.repeats)
    print(f"{args.images} images: generate_split {split:.2f} s, Pillow PNG floor {floor:.2f} s, "
          f"ratio {split / floor:.2f}x (best of {args.repeats})")


if __name__ == "__main__":
    main()

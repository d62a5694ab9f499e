"""How long a mistake takes to be reported, against `llava --help` in the same window; and the
time from a training command's start to its first step on a tiny model.

    OMP_NUM_THREADS=1 python bench/bench_answer_at_once.py [--runs 5]

Each case is a fresh `llava` process (what a user waits for); the minimum and median of
`--runs` are printed, with each error case's median as a ratio of `llava --help`'s. The
tiny run is `llava pretrain recipes/tiny/pretrain.yaml` for one step; its start → first step
is read from the time the first training log line appears on the terminal.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAVA = [sys.executable, "-m", "llava_cli"]

CASES = {
    "llava --help": ["--help"],
    "typo in a --set key": ["finetune", "--set", "learning_rat=1"],
    "typo in a recipe key": ["finetune", "{recipe}"],
    "bad value": ["finetune", "--set", "bits=5"],
    "bad flag value": ["finetune", "--lr", "abc"],
    "missing data file": ["finetune", "--data-path", "missing.json"],
    "missing local model": ["finetune", "--model-name-or-path", "./missing-model",
                            "--data-path", "{data}"],
}


def _time(argv: list[str], cwd: Path) -> tuple[float, int]:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, done.returncode


def _first_step(cwd: Path) -> float:
    """Seconds from launching a one-step tiny pretrain to its first loss line."""
    argv = [*LLAVA, "pretrain", str(ROOT / "recipes/tiny/pretrain.yaml"),
            "--set", f"data_path={ROOT / 'llava_cli/assets/sample/records.json'}",
            "--set", f"image_folder={ROOT / 'llava_cli/assets/sample'}",
            "--set", f"model_name_or_path={ROOT / 'recipes/tiny/llm'}",
            "--set", f"vision_tower={ROOT / 'recipes/tiny/vision'}",
            "--max-steps", "1", "-o", str(cwd / "tiny-run"), "--overwrite"]
    start = time.perf_counter()
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    first = None
    for line in process.stdout:  # type: ignore[union-attr]
        if first is None and "loss" in line:
            first = time.perf_counter() - start
    process.wait()
    if process.returncode != 0 or first is None:
        raise SystemExit(f"the tiny run failed (exit {process.returncode})")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-first-step", action="store_true")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "recipe.yaml").write_text("learnin_rate: 1e-3\n")
        (cwd / "data.json").write_text("[]\n")
        results = {}
        for name, args in CASES.items():
            argv = [*LLAVA, *(a.format(recipe=cwd / "recipe.yaml", data=cwd / "data.json")
                              for a in args)]
            runs = [_time(argv, cwd) for _ in range(options.runs)]
            codes = {code for _, code in runs}
            seconds = [s for s, _ in runs]
            results[name] = (min(seconds), statistics.median(seconds), codes)
        base = results["llava --help"][1]
        print(f"{'case':28} {'min s':>7} {'median s':>9} {'× --help':>9}  exit")
        for name, (low, median, codes) in results.items():
            print(f"{name:28} {low:7.2f} {median:9.2f} {median / base:9.2f}  "
                  f"{','.join(map(str, sorted(codes)))}")
        if not options.no_first_step:
            firsts = [_first_step(cwd) for _ in range(max(1, options.runs // 2))]
            print(f"\ntiny pretrain, start → first step: min {min(firsts):.2f} s, median "
                  f"{statistics.median(firsts):.2f} s ({len(firsts)} runs)")


if __name__ == "__main__":
    main()

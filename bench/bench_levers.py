"""Each speed lever alone, then all of them, against the plain HF path (all levers off).

    OMP_NUM_THREADS=1 python bench/bench_levers.py [--steps 30] [--out bench/out/levers]

The performance issue's setup (as `bench_train.py`): Llama hidden 128 × 2 layers, vocab 32000
(the real Llama-2 tokenizer); CLIP hidden 64 × 2 layers, 224 px, patch 32; batch 4, fp32,
gradient checkpointing, one thread; the golden synthetic data (411 records). Stage 1
(pretrain, `plain`), stage 2 full and stage 2 LoRA (`v1`, both from the stage-1 projector).
Every run is a fresh process in the same window; the table gives samples/s, peak RSS (the
training process's VmHWM, and the PSS of the whole process tree sampled every 0.2 s, dataloader
workers included, shared pages counted once)
and start → first step, with ratios against the all-off run of the same stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_check import tree_rss_kb  # noqa: E402
from bench_train import CHILD, GOLDEN, SHARED, make_parts  # noqa: E402

OFF = {"supervised_logits_only": False, "skip_frozen_backward": False, "padding_free": False,
       "packing": "off",
       "group_by_modality_length": False, "dataloader_num_workers": 0}
LEVERS = {
    "supervised logits": {"supervised_logits_only": True},
    "frozen: no backward": {"skip_frozen_backward": True},
    "length grouping": {"group_by_modality_length": True},
    "padding-free": {"padding_free": True},
    "1 worker, persistent": {"dataloader_num_workers": 1},
}


def variants() -> dict[str, dict]:
    """all off, each lever alone, all on, and all on but packing (it trades padding for a
    dense block-diagonal attention mask, which may not pay on every device)."""
    out = {"all off (plain HF)": dict(OFF)}
    out.update({f"+ {name}": {**OFF, **keys} for name, keys in LEVERS.items()})
    every = {k: v for keys in LEVERS.values() for k, v in keys.items()}
    out["all on"] = {**OFF, **every}
    out["all on, no padding-free"] = {**OFF, **every, "padding_free": False}
    return out


def run(stage: str, flags: dict) -> dict:
    """One training run in a fresh process; its measurements plus the sampled tree peak."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", CHILD, stage, json.dumps(flags)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_kb(process.pid, proportional=True))
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode:
        raise SystemExit(stderr[-3000:])
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_rss_mb"] = peak / 1024
    return result


def stage_flags(out: Path, steps: int) -> dict[str, tuple[str, dict]]:
    """Per benchmarked stage: (command, flags) without the lever settings."""
    llm, vit = make_parts(out)
    common = {"per_device_train_batch_size": 4, "max_steps": steps, "overwrite": True,
              "gradient_checkpointing": True, "save_strategy": "no", "logging_steps": 5,
              "image_folder": str(GOLDEN / "synthetic_images"),
              "tokenizer": str(SHARED / "tokenizers" / "llama2-vicuna-v1.5")}
    stage2 = {**common, "model_name_or_path": str(out / "stage1-start"),
              "data_path": str(GOLDEN / "synthetic_finetune.json")}
    return {
        "stage 1": ("pretrain", {**common, "model_name_or_path": str(llm),
                                 "vision_tower": str(vit), "random_init": True,
                                 "data_path": str(GOLDEN / "synthetic_pretrain.json")}),
        "stage 2 full": ("finetune", stage2),
        "stage 2 LoRA": ("lora", {**stage2, "lora_r": 16, "lora_alpha": 32}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/out/levers"))
    parser.add_argument("--only", help="run only the variants whose name contains this")
    args = parser.parse_args()
    stages = stage_flags(args.out, args.steps)
    command, flags = stages["stage 1"]  # the stage-2 runs start from this projector
    run(command, {**flags, **OFF, "max_steps": 1, "output_dir": str(args.out / "stage1-start")})
    rows = []
    for stage, (command, flags) in stages.items():
        base = None
        for name, levers in variants().items():
            if args.only and args.only not in name and base is not None:
                continue
            result = run(command, {**flags, **levers, "output_dir": str(args.out / "run")})
            base = base or result
            rows.append((stage, name, result, base))
            print(_row(stage, name, result, base), flush=True)
    print("\n| stage | run | samples/s | × | peak MB (main RSS / tree PSS) | × (tree) | "
          "start → step 1 s |\n|---|---|---:|---:|---:|---:|---:|")
    for stage, name, result, base in rows:
        print(_markdown(stage, name, result, base))


def _row(stage: str, name: str, r: dict, base: dict) -> str:
    return (f"{stage:<13} {name:<26} {r['samples_per_second']:7.2f} samples/s "
            f"({r['samples_per_second'] / base['samples_per_second']:.2f}×)  "
            f"RSS {r['peak_rss_mb']:5.0f} / PSS {r['tree_rss_mb']:5.0f} MB  "
            f"first step {r['first_step_s']:.1f} s")


def _markdown(stage: str, name: str, r: dict, base: dict) -> str:
    return (f"| {stage} | {name} | {r['samples_per_second']:.2f} | "
            f"{r['samples_per_second'] / base['samples_per_second']:.2f} | "
            f"{r['peak_rss_mb']:.0f} / {r['tree_rss_mb']:.0f} | "
            f"{r['tree_rss_mb'] / base['tree_rss_mb']:.2f} | {r['first_step_s']:.1f} |")


if __name__ == "__main__":
    main()

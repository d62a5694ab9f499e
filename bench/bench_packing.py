"""Cross-sample packing against padded batches, per attention implementation: what
`packing: auto` decides from (`RunConfig.packing_choice`, PACKING_MEASURED_FASTER).

    OMP_NUM_THREADS=1 python bench/bench_packing.py [--steps 30] [--out bench/out/packing]

The setup of `bench_levers.py` (tiny Llama 128 × 2 with the real Llama-2 tokenizer, CLIP 64 × 2
at 224 px, golden synthetic data, fp32, gradient checkpointing, one thread), every run a fresh
process in the same window, all other levers at their defaults. The padded baseline groups by
modality and length (what the original LLaVA run used, and our fastest padded setting); the
packed runs fill rows to a token budget. Records/s counts records, not rows (the Trainer's
samples/s × the mean samples per row). CPU only: flash-attention's varlen kernels need a GPU
(`bench/gpu_smoke.py` measures packing there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_levers import run, stage_flags  # noqa: E402

VARIANTS = {
    "padded, batch 4, length-grouped": {"packing": "off", "group_by_modality_length": True,
                                        "per_device_train_batch_size": 4},
    "packed, 4 rows ≤ 2048 (the default budget)": {"packing": "on",
                                                   "per_device_train_batch_size": 4},
    "packed, 4 rows ≤ 512 tokens": {"packing": "on", "packing_budget": 512,
                                    "per_device_train_batch_size": 4},
    "packed, 1 row ≤ 2048 tokens": {"packing": "on", "packing_budget": 2048,
                                    "per_device_train_batch_size": 1},
}
ATTENTION = ("sdpa", "eager")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/out/packing"))
    args = parser.parse_args()
    stages = stage_flags(args.out, args.steps)
    command, flags = stages["stage 1"]  # the stage-2 runs start from this projector
    run(command, {**flags, "max_steps": 1, "output_dir": str(args.out / "stage1-start")})
    rows = []
    for stage in ("stage 1", "stage 2 full"):
        command, flags = stages[stage]
        for attn in ATTENTION:
            base = None
            for name, keys in VARIANTS.items():
                result = run(command, {**flags, **keys, "attn_implementation": attn,
                                       "output_dir": str(args.out / "run")})
                base = base or result
                ratio = result["samples_per_second"] / base["samples_per_second"]
                rows.append((stage, attn, name, result, ratio, base))
                print(f"{stage:<13} {attn:<6} {name:<44} {result['samples_per_second']:7.2f} "
                      f"records/s ({ratio:.2f}×)  RSS {result['peak_rss_mb']:5.0f} MB", flush=True)
    print("\n| stage | attention | run | records/s | × | peak MB (main RSS / tree PSS) | × (tree) |"
          "\n|---|---|---|---:|---:|---:|---:|")
    for stage, attn, name, r, ratio, base in rows:
        print(f"| {stage} | {attn} | {name} | {r['samples_per_second']:.2f} | {ratio:.2f} | "
              f"{r['peak_rss_mb']:.0f} / {r['tree_rss_mb']:.0f} | "
              f"{r['tree_rss_mb'] / base['tree_rss_mb']:.2f} |")


if __name__ == "__main__":
    main()

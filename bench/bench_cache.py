"""The frozen-tower feature cache: samples/s without it, cold (a fresh cache: every image a
miss) and warm (a second run over the same images: every image a hit), per stage.

    OMP_NUM_THREADS=1 python bench/bench_cache.py [--steps 25] [--tower small|large]

Stage 1 (pretrain, projector only) and stage 2 full (finetune, tower frozen, from the stage-1
projector), each three fresh processes in a row: no cache, cold, warm. The setup is
`bench_train.py`'s (Llama 128 × 2, vocab 32000, the real Llama-2 tokenizer; batch 4, fp32,
gradient checkpointing, one thread; the golden synthetic data, whose first steps × 4 records
are all distinct images, so a cold run misses every image). `--tower small` is its CLIP
(64 × 2, 224 px, patch 32: 49 positions, cheap next to the LLM); `--tower large` a CLIP-shaped
tower whose cost dominates as CLIP-L/336's does in real LLaVA (256 × 6, 336 px, patch 14: 577
positions). Ratios are against the no-cache run of the same stage, measured in the same window.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import GOLDEN, SHARED, make_parts, run  # noqa: E402

TOWERS = {"small": None,  # bench_train's own
          "large": {"image_size": 336, "patch_size": 14, "hidden_size": 256,
                    "intermediate_size": 1024, "num_hidden_layers": 6,
                    "num_attention_heads": 4}}


def tower(out: Path, name: str) -> Path:
    """The vision tower's config folder for `--tower name`."""
    llm, vit = make_parts(out)
    if TOWERS[name] is None:
        return vit
    import transformers

    large = out / "vit-large"
    transformers.CLIPVisionConfig(**TOWERS[name]).save_pretrained(large)
    return large


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="small")
    parser.add_argument("--out", type=Path, default=Path("bench/out/cache"))
    args = parser.parse_args()
    out = args.out / args.tower
    vit = tower(out, args.tower)
    common = {"per_device_train_batch_size": 4, "max_steps": args.steps, "overwrite": True,
              "gradient_checkpointing": True, "save_strategy": "no", "logging_steps": 5,
              "image_folder": str(GOLDEN / "synthetic_images"),
              "tokenizer": str(SHARED / "tokenizers" / "llama2-vicuna-v1.5")}
    stage1 = {**common, "model_name_or_path": str(out / "llm"), "vision_tower": str(vit),
              "random_init": True, "data_path": str(GOLDEN / "synthetic_pretrain.json")}
    run("pretrain", {**stage1, "max_steps": 1, "output_dir": str(out / "stage1-start")})
    stages = {"stage 1": ("pretrain", stage1),
              "stage 2 full (frozen tower)": ("finetune", {
                  **common, "model_name_or_path": str(out / "stage1-start"),
                  "data_path": str(GOLDEN / "synthetic_finetune.json")})}
    rows = []
    for stage, (command, flags) in stages.items():
        cache = out / f"cache-{command}"
        shutil.rmtree(cache, ignore_errors=True)  # cold means cold
        results = {}
        for name, extra in (("no cache", {}), ("cache cold", {"vision_feature_cache": str(cache)}),
                            ("cache warm", {"vision_feature_cache": str(cache)})):
            results[name] = run(command, {**flags, **extra, "output_dir": str(out / "run")})
            metrics = json.loads((out / "run" / "train_results.json").read_text())
            results[name]["hits_misses"] = (f"{metrics.get('vision_feature_cache_hits', '–')} / "
                                            f"{metrics.get('vision_feature_cache_misses', '–')}")
            rows.append((stage, name, results[name], results["no cache"]))
            print(f"{stage:<28} {name:<11} {results[name]['samples_per_second']:7.2f} samples/s",
                  flush=True)
    print(f"\ntower {args.tower}, {args.steps} steps of 4\n"
          "| stage | run | samples/s | × | hits / misses | peak RSS MB | start → step 1 s |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for stage, name, result, base in rows:
        print(f"| {stage} | {name} | {result['samples_per_second']:.2f} | "
              f"{result['samples_per_second'] / base['samples_per_second']:.2f} | "
              f"{result['hits_misses']} | {result['peak_rss_mb']:.0f} | "
              f"{result['first_step_s']:.1f} |")


if __name__ == "__main__":
    main()

"""Benchmark 20-step stage-1 and stage-2 runs of a tiny LLaVA: samples/s, peak RSS, start-up.

    OMP_NUM_THREADS=1 python bench/bench_train.py [--steps 20] [--out bench/out/train]

Setup (as the model-factory issue specifies): LLM Llama hidden 128 × 2 layers, vocab 32000 (the
real Llama-2 tokenizer from ../shared/assets); CLIP hidden 64 × 2 layers, 224 px, patch 32;
batch 4, fp32, gradient checkpointing; the golden synthetic data in ../shared/assets/golden.
Each run is a fresh process, so peak RSS (VmHWM) and "start → first step" include imports,
model building and dataset indexing (which must not tokenize the data).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "assets"
GOLDEN = SHARED / "golden"

CHILD = r"""
import json, sys, time
START = time.time()
import transformers
from llava_cli.config.resolve import resolve_config
from llava_cli.train.run import run_training

class FirstStep(transformers.TrainerCallback):
    first = None
    def on_step_begin(self, args, state, control, **kw):
        if FirstStep.first is None:
            FirstStep.first = time.time() - START

class Reporter:
    def callback(self): return FirstStep()
    def summary(self, *a, **k): pass

stage, flags = sys.argv[1], json.loads(sys.argv[2])
result = run_training(resolve_config(stage, flags=flags), Reporter())
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
# Packed runs: the Trainer's "samples" are rows; records = rows × the mean pack size.
per_row = result.metrics.get("samples_per_row", 1.0)
print(json.dumps({"samples_per_second": result.metrics["train_samples_per_second"] * per_row,
                  "first_step_s": FirstStep.first, "peak_rss_mb": int(hwm) / 1024,
                  "wall_s": time.time() - START}))
"""


def make_parts(root: Path) -> tuple[Path, Path]:
    """Config folders of the benchmark's tiny LLM and vision tower."""
    import transformers

    llm, vit = root / "llm", root / "vit"
    transformers.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             max_position_embeddings=4096).save_pretrained(llm)
    transformers.CLIPVisionConfig(image_size=224, patch_size=32, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4).save_pretrained(vit)
    return llm, vit


def run(stage: str, flags: dict) -> dict:
    """One training run in a fresh process; returns its measurements."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, stage, json.dumps(flags)], env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/out/train"))
    args = parser.parse_args()
    llm, vit = make_parts(args.out)
    common = {"per_device_train_batch_size": 4, "max_steps": args.steps, "overwrite": True,
              "gradient_checkpointing": True, "save_strategy": "no", "logging_steps": 5,
              "image_folder": str(GOLDEN / "synthetic_images"),
              "tokenizer": str(SHARED / "tokenizers" / "llama2-vicuna-v1.5")}
    stage1 = run("pretrain", {**common, "model_name_or_path": str(llm),
                              "vision_tower": str(vit), "random_init": True,
                              "data_path": str(GOLDEN / "synthetic_pretrain.json"),
                              "output_dir": str(args.out / "stage1")})
    stage2 = run("finetune", {**common, "model_name_or_path": str(args.out / "stage1"),
                              "data_path": str(GOLDEN / "synthetic_finetune.json"),
                              "group_by_modality_length": True,
                              "output_dir": str(args.out / "stage2")})
    print(f"{'run':<8} {'samples/s':>10} {'peak RSS MB':>12} {'start→step 1 s':>15}")
    for name, r in (("stage 1", stage1), ("stage 2", stage2)):
        print(f"{name:<8} {r['samples_per_second']:>10.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['first_step_s']:>15.1f}")


if __name__ == "__main__":
    main()

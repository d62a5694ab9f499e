#!/usr/bin/env python
"""One-GPU smoke benchmark: a 7B-shaped LLaVA-1.5 stage-2 step, lever by lever, plus ZeRO-3.

Random init from configs only (Llama-2-7B text config + CLIP ViT-L/14-336 vision config), so it
needs no network and no weights. bf16, the vision tower frozen, a step of mixed-length samples
(lengths drawn like LLaVA-665k's, 576 image tokens each, prompts masked). One model per variant
is built once and measured in phases: every lever on, each lever off alone (supervised-logits
LM head, packing, frozen tower without backward, activation checkpointing), every lever off;
then LoRA on / off and one DeepSpeed ZeRO-3 single-GPU run. Per phase: samples/s, tokens/s
(real tokens), s/step, model TFLOP/s, MFU = model FLOPs ÷ (step time × the GPU's dense bf16
peak), peak memory. About 5–8 minutes on an H100/H200. `--tiny` runs the same logic on a toy
model on CPU (the tests). See bench/README-gpu.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # llava_cli from the checkout
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gpu_smoke_model as smoke  # noqa: E402

# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0}
LEVER_NAMES = ("supervised_logits", "packing", "frozen_no_backward", "checkpointing")
FORMULA = ("MFU = model FLOPs per step / (step time × peak); model FLOPs = (6 full | 4 LoRA) × "
           "(N_llm + hidden × vocab) × real tokens + 12 × layers × hidden × Σ len² + "
           "2 × N_vision × patches × images + 6 × N_proj × image tokens")


def phases(variant: str) -> list[tuple[str, smoke.Levers]]:
    """(name, levers) measured on one model of `variant`."""
    on = smoke.Levers()
    if variant != "full":
        return [("all on", on), ("all off", smoke.Levers(False, False, False, False))]
    return [("all on", on), *[(f"no {name.replace('_', ' ')}", on.without(name))
                              for name in LEVER_NAMES],
            ("all off", smoke.Levers(False, False, False, False))]


def measure(model: Any, optimizer: Any, samples: list, levers: smoke.Levers,
            args: argparse.Namespace, device: str, step: Any = None) -> dict[str, Any]:
    """Train `args.steps` steps on `samples` with `levers` (the first `args.warmup` untimed)."""
    import torch

    smoke.apply_levers(model, levers)
    batch = smoke.collate(samples, levers.packing, args.budget, args.attn, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, timed, warmup = [], 0.0, min(args.warmup, args.steps - 1)
    for number in range(args.steps):
        synchronize(device)
        tic = time.perf_counter()
        loss = (step or _torch_step)(model, optimizer, batch, levers.supervised_logits)
        synchronize(device)
        if number >= warmup:
            timed += time.perf_counter() - tic
        losses.append(loss)
    return {"step_s": timed / (args.steps - warmup), "first_loss": losses[0],
            "last_loss": losses[-1], "finite": all(math.isfinite(x) for x in losses),
            "rows": int(batch["input_ids"].shape[0]),
            "row_tokens": int(batch["input_ids"].shape[1]),
            "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                               if device.startswith("cuda") else None)}


def same_loss(model: Any, samples: list, args: argparse.Namespace, device: str) -> str:
    """The plain path's loss (padded, full logits) and the levers' (packed, supervised
    logits) on the same weights and samples: the levers change the cost, not the loss."""
    import torch

    model.eval()
    with torch.no_grad():
        plain = smoke.step_loss(model, smoke.collate(samples, False, args.budget, args.attn,
                                                     device), False).item()
        levers = smoke.step_loss(model, smoke.collate(samples, True, args.budget, args.attn,
                                                      device), True).item()
    model.train()
    return f"plain {plain:.4f}, levers on {levers:.4f} (Δ {abs(plain - levers):.1e})"


def _torch_step(model: Any, optimizer: Any, batch: dict, supervised_logits: bool) -> float:
    import torch

    loss = smoke.step_loss(model, batch, supervised_logits)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(variant: str, args: argparse.Namespace, device: str, samples: list,
                lengths: list[int], peak: float) -> list[dict[str, Any]]:
    """Build the variant's model once and measure each of its phases."""
    import torch

    config = smoke.configs(args.tiny)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = smoke.build_model(config, device, torch.bfloat16, variant == "lora", args.attn)
    built = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4 if variant == "lora" else 1e-5,
                                  weight_decay=0.0, fused=device.startswith("cuda"))
    flops = smoke.model_flops_per_step(model, config, lengths, variant == "lora")
    print(f"{variant}: same loss at the start weights: {same_loss(model, samples, args, device)}",
          flush=True)
    results = []
    for name, levers in phases(variant):
        try:
            result = measure(model, optimizer, samples, levers, args, device)
        except torch.cuda.OutOfMemoryError:
            result = {"oom": True}
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        results.append(_describe(result, f"{variant}: {name}", levers, flops, lengths, peak,
                                 built, trainable, model))
    del model, optimizer, trainable
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def _describe(result: dict, name: str, levers: Any, flops: float, lengths: list[int],
              peak: float, built: float, trainable: list, model: Any) -> dict[str, Any]:
    result.update(name=name, levers=getattr(levers, "__dict__", levers), build_s=round(built, 1),
                  samples=len(lengths), tokens=sum(lengths), peak_tflops=peak,
                  trainable=sum(p.numel() for p in trainable),
                  params=sum(p.numel() for p in model.parameters()))
    if not result.get("oom"):
        step = result["step_s"]
        result.update(samples_per_s=len(lengths) / step, tokens_per_s=sum(lengths) / step,
                      model_tflops_per_s=flops / step / 1e12, mfu=flops / step / (peak * 1e12))
    return result


def peak_for(device: str, given: float | None) -> float:
    """--peak-tflops, else the table entry for this GPU; on CPU a nominal 1 TFLOP/s."""
    import torch

    if given:
        return given
    if not device.startswith("cuda"):
        return 1.0
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16 TFLOP/s)")


def line(result: dict[str, Any], reference: dict[str, Any] | None) -> str:
    """One printed row; the ratio is tokens/s against the variant's all-on phase."""
    if result.get("skipped"):
        return f"{result['name']}: skipped ({result['skipped']})"
    if result.get("oom"):
        return f"{result['name']}: out of memory"
    ratio = (f"  ({result['tokens_per_s'] / reference['tokens_per_s']:.2f}× all on)"
             if reference and reference is not result and "tokens_per_s" in reference else "")
    memory = (f"  peak mem {result['max_memory_gib']:.1f} GiB"
              if result.get("max_memory_gib") is not None else "")
    return (f"{result['name']}: {result['samples_per_s']:.2f} samples/s  "
            f"{result['tokens_per_s']:.0f} tokens/s  {result['step_s']:.3f} s/step  "
            f"{result['model_tflops_per_s']:.1f} model TFLOP/s  MFU {100 * result['mfu']:.1f}%  "
            f"rows {result['rows']}×{result['row_tokens']}  loss {result['first_loss']:.3f} → "
            f"{result['last_loss']:.3f}{memory}{ratio}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy model (CPU-testable logic)")
    parser.add_argument("--steps", type=int, default=8, help="steps per phase")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per phase")
    parser.add_argument("--samples", type=int, default=None, help="per step; default 8 (tiny 4)")
    parser.add_argument("--budget", type=int, default=None,
                        help="packing: tokens per row; default 4096 (tiny 96)")
    parser.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
    parser.add_argument("--variants", default="full,lora,zero3",
                        help="comma list: full, lora, zero3 (ZeRO-3 needs deepspeed)")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU (default: by name; H100/H200 989)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.samples = args.samples or (4 if args.tiny else 8)
    args.budget = args.budget or (96 if args.tiny else 4096)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and not device.startswith("cuda"):
        raise SystemExit("the 7B-shaped run needs a GPU; use --tiny on CPU")
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    peak = peak_for(device, args.peak_tflops)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    lengths = smoke.sample_lengths(args.samples, args.tiny, seed=0)
    samples = smoke.synthetic_samples(smoke.configs(args.tiny), lengths, torch.bfloat16)
    shape = "tiny" if args.tiny else "7B-shaped"
    print(f"device {where}; peak {peak:g} TFLOP/s dense bf16; {shape} LLaVA, {args.attn};"
          f" a step = {len(lengths)} samples, {sum(lengths)} tokens (lengths "
          f"{min(lengths)}–{max(lengths)}); packing budget {args.budget}; {args.steps} steps per "
          f"phase ({min(args.warmup, args.steps - 1)} untimed)\n{FORMULA}", flush=True)
    results = []
    for variant in args.variants.split(","):
        if variant not in ("full", "lora", "zero3"):
            raise SystemExit(f"unknown variant {variant!r}")
        if variant == "zero3":
            from gpu_smoke_zero3 import run_zero3

            found = run_zero3(args, device, samples, lengths, peak, measure, _describe)
        else:
            found = run_variant(variant, args, device, samples, lengths, peak)
        for result in found:
            print(line(result, found[0]), flush=True)
            if not result.get("oom") and not result.get("skipped") and not result["finite"]:
                print(f"{result['name']}: NON-FINITE LOSS", file=sys.stderr)
                return 1
        results += found
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

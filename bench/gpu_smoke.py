#!/usr/bin/env python
"""One-GPU smoke benchmark: a 7B-shaped LLaVA-1.5 finetune step loop, full and LoRA.

Random init from configs only (Llama-2-7B text config + CLIP ViT-L/14-336 vision config), so it
needs no network and no weights. bf16 weights, SDPA attention, gradient checkpointing, synthetic
batches (576 image tokens + text, labels masked on the image positions, as LLaVA trains). Prints
per variant: step time, samples/s, tokens/s, model TFLOP/s and MFU = model FLOPs ÷ (time × peak).

Needs only torch, transformers and (for the LoRA variant) peft — none of llava_cli's other
dependencies. See bench/README-gpu.md. `--tiny` runs the same logic on a toy model on CPU (tests).

Model FLOPs (not hardware FLOPs: gradient-checkpointing recompute is not counted, as usual for
MFU), per trained token of the LLM: 6·N (full: forward + input grads + weight grads) or 4·N (LoRA:
frozen weights get no weight grads; the adapters' own FLOPs are negligible), N = non-embedding
LLM parameters, plus attention 12·layers·hidden·seq (full-matrix convention, as in PaLM). The
frozen vision tower runs forward only: 2·N_vision per patch; the projector trains: 6·N_proj per
image token.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
               "A10G": 70.0, "L4": 121.0}
IMAGE_TOKEN_ID = 32000  # LLaVA-1.5: the first id past Llama-2's 32000-token vocabulary


def configs(tiny: bool) -> Any:
    """LlavaConfig: LLaVA-1.5-7B's shapes, or a toy of the same structure with `tiny`."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if tiny:
        text = LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=512)
        vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4)
        image_token = 600
    else:  # meta-llama/Llama-2-7b-hf and openai/clip-vit-large-patch14-336, as published
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, rms_norm_eps=1e-5)
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024,
                                  intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, projection_dim=768,
                                  hidden_act="quick_gelu")
        image_token = IMAGE_TOKEN_ID
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_token,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu",
                       image_seq_length=(vision.image_size // vision.patch_size) ** 2)


def build_model(config: Any, device: str, dtype: Any, lora: bool) -> Any:
    """Random-init LLaVA on `device` (initialised there: fast on a GPU), trainability set."""
    import torch
    from transformers import LlavaForConditionalGeneration

    config.text_config.use_cache = False
    with torch.device(device):
        try:
            model = LlavaForConditionalGeneration._from_config(config, dtype=dtype,
                                                               attn_implementation="sdpa")
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = LlavaForConditionalGeneration._from_config(config, torch_dtype=dtype,
                                                               attn_implementation="sdpa")
    parts(model).vision_tower.requires_grad_(False)  # LLaVA-1.5 finetune: vision tower frozen
    # Non-reentrant: works with a frozen vision tower and with LoRA (no input-grad hooks).
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = (r".*language_model\.layers\.\d+\."
                   r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)")
        model = get_peft_model(model, LoraConfig(
            r=128, lora_alpha=256, lora_dropout=0.05, target_modules=targets,
            modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
    model.train()
    return model


def parts(model: Any) -> Any:
    """The module holding vision_tower / multi_modal_projector / language_model (transformers
    >= 4.52 nests them under `.model`; older versions keep them on the top-level model)."""
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "multi_modal_projector") else model


def synthetic_batch(config: Any, batch: int, seq: int, device: str, dtype: Any,
                    seed: int = 0, prompt_fraction: float = 0.5) -> dict[str, Any]:
    """`batch` samples of `seq` tokens: BOS, the image tokens, then random text; labels mask
    BOS, the image and the first `prompt_fraction` of the text (the prompt), as LLaVA does."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    image_tokens = config.image_seq_length
    if seq <= image_tokens + 2:
        raise ValueError(f"--seq-len must exceed the {image_tokens} image tokens + 2")
    vocab = config.text_config.vocab_size
    text = torch.randint(3, min(vocab, config.image_token_id), (batch, seq - image_tokens - 1),
                         generator=generator)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long),
                     torch.full((batch, image_tokens), config.image_token_id), text], dim=1)
    labels = ids.clone()
    prompt = int((seq - image_tokens - 1) * prompt_fraction)
    labels[:, :image_tokens + 1 + prompt] = -100
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}


def model_flops_per_step(model: Any, config: Any, batch: int, seq: int, lora: bool) -> float:
    """Model FLOPs of one training step (see the module docstring for the convention)."""
    base = model.get_base_model() if lora else model
    inner = parts(base)
    n_llm = sum(p.numel() for n, p in inner.language_model.named_parameters()
                if "embed_tokens" not in n and "lora_" not in n and "lm_head" not in n)
    n_vision = sum(p.numel() for p in inner.vision_tower.parameters())
    n_proj = sum(p.numel() for n, p in inner.multi_modal_projector.named_parameters()
                 if "original_module" not in n)
    text = config.text_config
    tokens = batch * seq
    llm = (4 if lora else 6) * n_llm * tokens
    attention = 12 * text.num_hidden_layers * text.hidden_size * seq * tokens
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1
    vision = 2 * n_vision * patches * batch
    projector = 6 * n_proj * config.image_seq_length * batch
    lm_head = (4 if lora else 6) * text.hidden_size * text.vocab_size * tokens
    return float(llm + attention + vision + projector + lm_head)


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_loss(model: Any, batch: dict[str, Any], levers: bool) -> Any:
    """The plain HF loss (full [batch, seq, vocab] logits) or, with the levers, llava_cli's
    loss at the supervised positions only (equal value; `llava_cli/train/loss.py` imports torch
    only, so it runs from the repository root without installing llava_cli)."""
    if not levers:
        return model(**batch).loss
    from llava_cli.train.loss import supervised_cross_entropy, supervised_positions

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = model(**inputs, use_cache=False, logits_to_keep=supervised_positions(labels))
    return supervised_cross_entropy(outputs, labels)


def run_variant(name: str, args: argparse.Namespace, device: str, dtype: Any,
                peak_tflops: float, levers: bool = False) -> dict[str, Any]:
    """Build, train `args.steps` steps (the first `args.warmup` untimed), report throughput.

    `levers`: loss at supervised positions only, and the frozen vision tower without the
    input-grad hook transformers' checkpointing puts on it (no backward through it)."""
    import torch

    config = configs(args.tiny)
    lora = name == "lora"
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(config, device, dtype, lora)
    if levers:
        base = model.get_base_model() if lora else model
        base.disable_input_require_grads()  # non-reentrant checkpointing needs no hook
    built = time.perf_counter() - started
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5 if not lora else 2e-4, weight_decay=0.0,
                                  fused=device.startswith("cuda"))
    batch = synthetic_batch(config, args.batch_size, args.seq_len, device, dtype,
                            prompt_fraction=args.prompt_fraction)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    losses, timed = [], 0.0
    warmup = min(args.warmup, args.steps - 1)
    for step in range(args.steps):
        synchronize(device)
        tic = time.perf_counter()
        loss = step_loss(model, batch, levers)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= warmup:
            timed += time.perf_counter() - tic
        losses.append(loss.item())
    steps = args.steps - warmup
    step_time = timed / steps
    flops = model_flops_per_step(model, config, args.batch_size, args.seq_len, lora)
    result = {
        "variant": name, "levers": levers, "device": device,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable), "build_s": round(built, 1),
        "batch": args.batch_size, "seq_len": args.seq_len, "timed_steps": steps,
        "step_s": step_time, "samples_per_s": args.batch_size / step_time,
        "tokens_per_s": args.batch_size * args.seq_len / step_time,
        "model_tflops_per_s": flops / step_time / 1e12,
        "mfu": flops / step_time / (peak_tflops * 1e12), "peak_tflops": peak_tflops,
        "first_loss": losses[0], "last_loss": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
        "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                           if device.startswith("cuda") else None),
    }
    del model, optimizer, batch, trainable
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy model (CPU-testable logic)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sample incl. 576 image tokens; default 2048 (tiny: 48)")
    parser.add_argument("--variants", default="full,lora", help="comma list: full, lora")
    parser.add_argument("--levers", choices=("off", "on", "both"), default="both",
                        help="llava_cli's speed levers off (plain HF), on, or both in turn")
    parser.add_argument("--prompt-fraction", type=float, default=0.5,
                        help="share of the text tokens that is unsupervised prompt")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the GPU (default: by name; H100/H200 989)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    args.batch_size = args.batch_size or (2 if args.tiny else 4)
    args.seq_len = args.seq_len or (48 if args.tiny else 2048)
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
    dtype = torch.bfloat16
    peak = peak_for(device, args.peak_tflops)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device {where}; peak {peak:g} TFLOP/s bf16; {'tiny' if args.tiny else '7B-shaped'} "
          f"LLaVA; batch {args.batch_size} × {args.seq_len} tokens; {args.steps} steps "
          f"({min(args.warmup, args.steps - 1)} untimed)", flush=True)
    results = []
    lever_runs = {"off": [False], "on": [True], "both": [False, True]}[args.levers]
    for name, levers in [(n, on) for n in args.variants.split(",") for on in lever_runs]:
        if name not in ("full", "lora"):
            raise SystemExit(f"unknown variant {name!r}")
        result = run_variant(name, args, device, dtype, peak, levers)
        results.append(result)
        off = [r for r in results if r["variant"] == name and not r["levers"]]
        ratio = (f"  ({result['tokens_per_s'] / off[0]['tokens_per_s']:.2f}× levers off)"
                 if levers and off else "")
        name = f"{name} levers {'on' if levers else 'off'}"
        memory = (f"  peak mem {result['max_memory_gib']:.1f} GiB"
                  if result["max_memory_gib"] is not None else "")
        print(f"{name}: {result['samples_per_s']:.2f} samples/s  {result['tokens_per_s']:.0f} "
              f"tokens/s  {result['step_s']:.3f} s/step  {result['model_tflops_per_s']:.1f} "
              f"model TFLOP/s  MFU {100 * result['mfu']:.1f}%  loss {result['first_loss']:.3f}"
              f" → {result['last_loss']:.3f}  build {result['build_s']} s  trainable "
              f"{result['trainable'] / 1e6:.1f}M / {result['params'] / 1e6:.1f}M{memory}{ratio}",
              flush=True)
        if not result["finite"]:
            print(f"{name}: NON-FINITE LOSS", file=sys.stderr)
            return 1
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gpu_smoke.py`'s DeepSpeed ZeRO-3 run: the full variant, every lever on, on one process.

One process is a world of one, so ZeRO-3 partitions nothing away; what it measures is the
engine's own cost (parameter gathering hooks, fp32 master weights, its bf16 handling) against
the plain PyTorch step of the same model, which is what a user pays for the recipe's
`zero3.json` before adding GPUs. Skipped, with the reason printed, when deepspeed is missing.
"""

from __future__ import annotations

import time
from typing import Any

import gpu_smoke_model as smoke

from llava_cli.train.process import prepare_environment


def run_zero3(args: Any, device: str, samples: list, lengths: list[int], peak: float,
              measure: Any, describe: Any) -> list[dict[str, Any]]:
    """Build the full variant under a ZeRO-3 engine and measure it with every lever on."""
    name = "zero3: all on"
    try:
        import deepspeed
    except ImportError:
        return [{"name": name, "skipped": "deepspeed is not installed"}]
    import torch

    prepare_environment(True)  # a world of one, as `llava` trains under DeepSpeed alone
    cuda = device.startswith("cuda")
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    # bf16 on the GPU; DeepSpeed's CPU accelerator (the --tiny test) trains in fp32.
    dtype = torch.bfloat16 if cuda else torch.float32
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "gradient_clipping": 1.0, "bf16": {"enabled": cuda},
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    config = smoke.configs(args.tiny)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = smoke.build_model(config, device, dtype, lora=False, attn=args.attn)
    flops = smoke.model_flops_per_step(model, config, lengths, lora=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    built = time.perf_counter() - started
    if not cuda:
        samples = [{**s, "pixel_values": s["pixel_values"].float()} for s in samples]

    def step(_model: Any, _optimizer: Any, batch: dict, supervised_logits: bool) -> float:
        loss = smoke.step_loss(engine, batch, supervised_logits)
        engine.backward(loss)
        engine.step()
        return loss.item()

    try:
        result = measure(engine.module, None, samples, smoke.Levers(), args, device, step)
    except torch.cuda.OutOfMemoryError:
        result = {"oom": True}
    result = describe(result, name, smoke.Levers(), flops, lengths, peak, built, trainable,
                      engine.module)
    result["params"] = params  # the engine's module holds partitioned placeholders
    engine.destroy()
    return [result]

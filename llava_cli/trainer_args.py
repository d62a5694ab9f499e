"""The only module that turns our configuration into `transformers.TrainingArguments`."""

from __future__ import annotations

from typing import Any

from llava_cli.config import RunConfig

# Our defaults where transformers' do not suit LLaVA training; any of them can be overridden.
DEFAULTS: dict[str, Any] = {
    "report_to": "none",  # never phone home unless asked
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 2,
    "disable_tqdm": True,  # our Rich progress replaces it
}


def to_training_arguments(config: RunConfig, output_dir: str) -> Any:
    """Build TrainingArguments: our defaults < `training_args` from the config < fixed values.

    Fixed: `remove_unused_columns=False` (the collator decides the model inputs), non-reentrant
    gradient checkpointing (works with frozen inputs and LoRA), `use_cpu` without CUDA (else
    torchrun's ranks would each train the whole job, silently).
    """
    import torch
    from transformers import TrainingArguments

    values = {**DEFAULTS, **config.training_args}
    values.update(output_dir=output_dir, remove_unused_columns=False)
    if values.get("gradient_checkpointing"):
        values.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    if not torch.cuda.is_available():
        values["use_cpu"] = True
        for half in ("bf16", "fp16"):  # no half-precision training on CPU through Trainer
            if values.get(half) and half == "fp16":
                raise ValueError("fp16 training needs a GPU; use bf16 or float32 on CPU")
    if config.group_by_modality_length:
        values.pop("train_sampling_strategy", None)  # our sampler replaces the built-in ones
    try:
        return TrainingArguments(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid training arguments: {err}") from err

"""Checks of the Trainer's own settings that must fail before anything loads: counts it would
divide by or loop zero times over, and logging integrations whose package is missing."""

from __future__ import annotations

from typing import Any

# report_to integrations → the packages that provide them (any one will do).
REPORTER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",),
                     "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "clearml": ("clearml",),
                     "neptune": ("neptune",), "dvclive": ("dvclive",), "trackio": ("trackio",)}


def refuse_missing_reporters(report_to: Any) -> None:
    """One line naming the install command, not a traceback after the model has loaded."""
    import importlib.util

    names = report_to.split(",") if isinstance(report_to, str) else list(report_to or [])
    for name in (str(n).strip() for n in names):
        packages = REPORTER_PACKAGES.get(name)
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            raise ValueError(f"report_to {name} needs the {packages[0]} package: "
                             f"pip install {packages[0]}")


POSITIVE_COUNTS = ("per_device_train_batch_size", "per_device_eval_batch_size",
                   "gradient_accumulation_steps")
POSITIVE_INTERVALS = ("save_steps", "logging_steps", "eval_steps")  # below 1: a ratio


def refuse_impossible_counts(training_args: dict[str, Any]) -> None:
    """Counts the Trainer would divide by, loop zero times over, or crash on — one line
    before anything loads. `num_train_epochs` of 0 or less counts only without `max_steps`
    (which overrides the epochs in transformers)."""
    for name in POSITIVE_COUNTS:
        value = training_args.get(name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} {value!r}: must be a whole number of at least 1")
    for name in POSITIVE_INTERVALS:
        value = training_args.get(name)
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"{name} {value!r}: must be above 0")
    max_steps = training_args.get("max_steps")
    if isinstance(max_steps, int) and (max_steps == 0 or max_steps < -1):
        raise ValueError(f"max_steps {max_steps}: give a number of steps of at least 1 (or "
                         "leave it out to train for num_train_epochs)")
    epochs = training_args.get("num_train_epochs")
    if isinstance(epochs, (int, float)) and epochs <= 0 and \
            not (isinstance(max_steps, int) and max_steps > 0):
        raise ValueError(f"num_train_epochs (--epochs) is {epochs:g}: nothing would be "
                         "trained; give a positive number of epochs (0.5 is half of one), "
                         "or max_steps")


def refuse_preference_conflicts(config: Any) -> None:
    """What preference training (`objective: dpo`) cannot do, one line each."""
    from llava_cli.config.deepspeed import deepspeed_stage

    if config.beta <= 0:
        raise ValueError(f"beta {config.beta}: must be above 0 (DPO's KL strength; TRL's "
                         "default is 0.1)")
    if config.rpo_alpha is not None and config.rpo_alpha < 0:
        raise ValueError(f"rpo_alpha {config.rpo_alpha}: must be at least 0")
    if config.random_init:
        raise ValueError("dpo starts from a trained model (a finetune or merged output, or a "
                         "LLaVA checkpoint): its reference is that model; drop random_init")
    if config.reference == "disabled-adapter" and config.train_llm != "lora":
        raise ValueError("reference disabled-adapter is the LoRA model with its adapters off; "
                         "add --lora, or use reference copy")
    if config.packing == "on" or config.padding_free:
        raise ValueError("dpo pads each pair's rows (chosen and rejected share one image "
                         "encoding); drop packing / padding_free")
    if config.vision_feature_cache:
        raise ValueError("vision_feature_cache is for supervised stages; dpo already encodes "
                         "each image once per pair: drop it")
    if (config.precompute_ref_log_probs and config.reference_kind == "disabled-adapter"
            and deepspeed_stage(config.training_args.get("deepspeed")) == 3):
        raise ValueError("precompute_ref_log_probs under ZeRO-3 with LoRA is not supported (the "
                         "model has no engine before training); the disabled-adapter reference "
                         "needs no memory of its own: drop precompute_ref_log_probs")


def refuse_uncacheable_tower(train_vision_tower: str, image_aspect_ratio: str,
                             deepspeed: Any) -> None:
    """`vision_feature_cache` only where cached outputs are exactly the tower's (one line)."""
    if train_vision_tower != "frozen":
        raise ValueError(f"vision_feature_cache caches a frozen vision tower's outputs, but "
                         f"train_vision_tower is {train_vision_tower!r}; freeze the tower or "
                         "drop the cache")
    if image_aspect_ratio == "anyres":
        raise ValueError("vision_feature_cache is not supported yet with image_aspect_ratio "
                         "anyres (LLaVA-NeXT); use pad or square, or drop the cache")
    from llava_cli.config.deepspeed import deepspeed_stage

    if deepspeed_stage(deepspeed) == 3:
        raise ValueError("vision_feature_cache is not supported under DeepSpeed ZeRO-3 (the "
                         "tower's weights are partitioned); use ZeRO-2, DDP or one device")

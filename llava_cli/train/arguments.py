"""The one mapping from our configuration to the Trainer's arguments.

`argument_values` is a pure function of the configuration and two facts about the machine
(a GPU or not, the dataloader workers to use); `LlavaTrainingArguments` carries the project's
own trainer settings beside transformers' fields, so the trainer reads every setting from its
`args`. Process and environment set-up (DeepSpeed without a launcher) is `train.process`.
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any

from transformers import TrainingArguments

from llava_cli.artifacts.manifest import OutputKind
from llava_cli.config.declared import declared_settings, trainer_defaults
from llava_cli.config.run_config import RunConfig

# Our settings the trainer reads from its `args` (declared once, in `config.run_config`: the
# dataclass fields below are made from those declarations, help text included).
CARRIED = ("projector_lr", "vision_tower_lr", "group_by_modality_length",
           "supervised_logits_only", "vision_feature_cache", "beta", "loss_type", "rpo_alpha",
           "eval_generate", "eval_generate_image_folder", "eval_generate_max_new_tokens",
           "template", "image_aspect_ratio")


def _carried_fields() -> list[tuple[str, Any, Any]]:
    by_name = {s.name: s for s in declared_settings()}
    out: list[tuple[str, Any, Any]] = [
        (name, Any, field(default=by_name[name].default,
                          metadata={"help": by_name[name].setting.help}))
        for name in CARRIED]
    out.append(("output_kind", OutputKind, field(
        default=OutputKind.FULL, metadata={"help": "What checkpoints hold: projector|full|lora."})))
    return out


# transformers' TrainingArguments plus the settings `LlavaTrainer` reads (a module-level name:
# the Trainer pickles its args into every checkpoint).
LlavaTrainingArguments = make_dataclass(
    "LlavaTrainingArguments", _carried_fields(), bases=(TrainingArguments,),
    namespace={"__module__": __name__,
               "__doc__": "transformers' TrainingArguments plus the settings LlavaTrainer adds."})


def to_training_arguments(config: RunConfig, output_dir: str) -> LlavaTrainingArguments:
    """The Trainer's arguments for `config` on this machine (see `argument_values`)."""
    import torch

    values = argument_values(config, output_dir, on_cpu=not torch.cuda.is_available(),
                             workers=default_workers())
    try:
        return LlavaTrainingArguments(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid training arguments: {err}") from err


def argument_values(config: RunConfig, output_dir: str, *, on_cpu: bool, workers: int
                    ) -> dict[str, Any]:
    """Our defaults < `training_args` from the config < fixed values, plus our own settings.

    Fixed: `remove_unused_columns=False` (the collator decides the model inputs), non-reentrant
    gradient checkpointing (works with frozen inputs and LoRA), `use_cpu` without CUDA (else
    torchrun's ranks would each train the whole job, silently). Pure: reads nothing else.
    """
    values = {**trainer_defaults(), **config.training_args}
    values.update(output_dir=output_dir, remove_unused_columns=False)
    if config.warmup_ratio is not None:  # transformers 5: a warmup_steps below 1 is a ratio
        values.setdefault("warmup_steps", config.warmup_ratio)
    if on_cpu and values.get("fsdp"):
        raise ValueError("FSDP does not run on CPU with this stack: accelerate only enables it "
                         "for GPU-like backends and would silently train plain DDP instead. "
                         "Use DeepSpeed ZeRO-3 (--deepspeed recipes/deepspeed/zero3.json) or DDP")
    _current_checkpointing_names(values)
    if values.get("activation_checkpointing"):
        values.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})
    _input_pipeline(values, on_cpu, workers)
    _evaluation(values, bool(config.eval_data_path), generated=bool(config.eval_generate))
    if on_cpu:
        if values.get("use_liger_kernel"):
            raise ValueError("use_liger_kernel needs a CUDA GPU (its kernels are Triton); on CPU "
                             "leave it off: supervised_logits_only is the fast loss here")
        values["use_cpu"] = True
        if values.get("fp16"):  # fp16 mixed precision needs CUDA's loss scaling; bf16 runs
            raise ValueError("fp16 training needs a GPU; use bf16 or float32 on CPU")
    if config.group_by_modality_length:
        values.pop("train_sampling_strategy", None)  # our sampler replaces the built-in ones
    if values.get("train_sampling_strategy") == "batch_rebalance":
        raise ValueError("train_sampling_strategy 'batch_rebalance' measures every sample by "
                         "loading it (the whole dataset tokenized, every image decoded) before "
                         "the first step; use --group-by-modality-length, or "
                         "train_sampling_strategy group_by_length: both take the lengths from "
                         "the record index")
    values.update({name: getattr(config, name) for name in CARRIED},
                  output_kind=config.output_kind)
    return values


def _current_checkpointing_names(values: dict[str, Any]) -> None:
    """LLaVA's `gradient_checkpointing*` names → transformers 5's `activation_checkpointing*`
    (the old ones are deprecated aliases); a value given under the new name wins."""
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in values:
            value = values.pop(old)
            values.setdefault(new, value)


# When to evaluate held-out records, by save strategy: at every save; at the end of each
# epoch when nothing is saved; "best" saves need an evaluation at each step interval.
EVALUATE_WITH_SAVES = {"steps": "steps", "epoch": "epoch", "best": "steps", "no": "epoch"}


def _evaluation(values: dict[str, Any], held_out: bool, generated: bool = False) -> None:
    """With held-out data or a QA file (`generated`: eval_accuracy from answers), evaluate with
    the saves (unless `eval_strategy` is set), loss only: no command computes metrics from
    logits, and gathering them for a whole evaluation set costs memory for nothing. Without
    either, asking for evaluation is an error. With the QA file alone there is no eval_loss,
    so the best checkpoint is by eval_accuracy unless another metric is named."""
    if generated and not held_out and (values.get("load_best_model_at_end")
                                       or _strategy(values["save_strategy"]) == "best"):
        values.setdefault("metric_for_best_model", "eval_accuracy")
    if not (held_out or generated):
        strategy = _strategy(values.get("eval_strategy", "no"))
        if strategy != "no" or values.get("do_eval"):
            asked = f"eval_strategy {strategy!r}" if strategy != "no" else "do_eval"
            raise ValueError(f"{asked} needs held-out records to evaluate on: give "
                             "--eval-data-path FILE.json or a QA file --eval-generate QA.json "
                             "(or drop it)")
        return
    values.setdefault("eval_strategy", EVALUATE_WITH_SAVES[_strategy(values["save_strategy"])])
    if _strategy(values["eval_strategy"]) == "steps":
        values.setdefault("eval_steps", values["save_steps"])
    values.setdefault("per_device_eval_batch_size",
                      values.get("per_device_train_batch_size", 8))
    values.setdefault("prediction_loss_only", True)


def _strategy(value: Any) -> str:
    """'steps' from 'steps', 'STEPS' or IntervalStrategy.STEPS."""
    return str(getattr(value, "value", value)).lower()


def _input_pipeline(values: dict[str, Any], on_cpu: bool, workers: int) -> None:
    """Image decoding and tokenization in dataloader workers (unless set: `default_workers`),
    alive for the whole run (no re-fork and index re-open per epoch); pinned host memory only
    where there is a GPU to copy to."""
    values.setdefault("dataloader_num_workers", workers)
    if values["dataloader_num_workers"] > 0:
        values.setdefault("dataloader_persistent_workers", True)
    if on_cpu:
        values.setdefault("dataloader_pin_memory", False)


def default_workers() -> int:
    """Dataloader workers per training process: half the cores this process may use, at most 4
    (LLaVA's setting); 0 when that leaves less than one core (e.g. 2 processes on 2 cores),
    where a worker would only compete with the training it should feed."""
    import os

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, (cores or 1) // (2 * local_processes))

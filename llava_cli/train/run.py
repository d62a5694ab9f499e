"""`pretrain`, `finetune`, `lora` and `dpo`: the one orchestration of a training run.

configuration → output directory checks → TrainingArguments (first: ZeRO-3 must see the
DeepSpeed config before any model is built) → starting model → trainability / LoRA → the
stage's datasets, collator and trainer (an `EvaluatingTrainer`: with `--eval-generate`, its
evaluations also answer a QA file) → outputs: weights by kind, processor with the training chat
template, resolved config, run manifest, train metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from llava_cli.artifacts.manifest import OutputKind
from llava_cli.config.run_config import RunConfig
from llava_cli.data.batching.packing import PackedDataset
from llava_cli.train.checkpoints import clear_previous_checkpoints
from llava_cli.train.stages import preference, supervised


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    kind: OutputKind
    metrics: dict[str, Any]
    trainer: Any = None  # the finished trainer (its model is the trained, in-memory model)


def prepare_model(config: RunConfig, model: Any, args: Any = None) -> tuple[Any, dict[str, int]]:
    """Apply the declared trainability (and LoRA) — the one call that sets requires_grad."""
    from llava_cli.model.lora import apply_lora
    from llava_cli.model.parts import apply_trainability, trainable_counts

    if config.train_llm == "lora":
        # sets trainability itself (LoRA weights + full parts)
        model = apply_lora(model, config, _deepspeed_dtype(args))
        return model, trainable_counts(model)
    return model, apply_trainability(model, config.train_vision_tower, config.train_projector,
                                     config.train_llm, config.train_lm_head,
                                     config.mm_use_im_start_end)


def _lora_layers(model: Any) -> list[str]:
    """What LoRA wrapped (none for a run without LoRA), for the summary."""
    from llava_cli.model.lora import lora_layers

    return lora_layers(model)


def _deepspeed_dtype(args: Any) -> Any:
    """The dtype DeepSpeed trains in, for bf16/fp16 DeepSpeed runs (None otherwise: the
    Trainer's own mixed precision keeps float32 weights)."""
    if args is None or not args.deepspeed or not (args.bf16 or args.fp16):
        return None
    import torch

    return torch.bfloat16 if args.bf16 else torch.float16


def run_training(config: RunConfig, reporter: Any = None,
                 stage: ModuleType | None = None) -> RunResult:
    """Train as configured and write the output directory; returns where and what.

    `stage` supplies the data side and the trainer (`check_data`, `datasets`, `collator`,
    `trainer`): by default the configuration's objective's (supervised, or preference for
    dpo). The output directory is locked for the whole run (by the launching process: rank 0).
    """
    stage = stage or (preference if config.objective == "dpo" else supervised)
    from llava_cli.artifacts.ranks import is_main_process
    from llava_cli.train.outputs import prepare_output_dir, publishing_run

    main = is_main_process()
    with publishing_run(config, main) as staging:  # published when the block ends
        return _train(config, reporter, stage, prepare_output_dir(config, main), staging)


def _train(config: RunConfig, reporter: Any, stage: ModuleType, output_dir: Path,
           staging: Path) -> RunResult:
    from transformers import set_seed

    from llava_cli.data.text.chat_template import attach_chat_template
    from llava_cli.data.text.stops import set_generation_stops
    from llava_cli.model.start import load_starting_model
    from llava_cli.model.vision import match_image_policy
    from llava_cli.train.arguments import to_training_arguments
    from llava_cli.train.eval_generate import check_qa_set
    from llava_cli.train.feature_cache import cache_metrics
    from llava_cli.train.outputs import resume_checkpoint, write_outputs
    from llava_cli.train.process import (
        choose_cpu_threads,
        prepare_environment,
        start_deepspeed_comm,
    )
    from llava_cli.train.reporting import report_dropped

    resume_from = resume_checkpoint(config, output_dir)  # fail before building a model
    qa_set = check_qa_set(config)  # --eval-generate's records: read whole, checked, in a second
    # Before torch.distributed starts: the scan forks worker processes.
    # Bad records are an error now, not at their first batch; the lengths serve packing.
    lengths = stage.check_data(config)
    prepare_environment(config.training_args.get("deepspeed"))
    args = to_training_arguments(config, str(output_dir))
    start_deepspeed_comm(args)
    set_seed(args.seed)  # before building: random-init parts and new rows are reproducible
    loaded = load_starting_model(config)
    threads = choose_cpu_threads(_hidden_size(loaded.model), args.dataloader_num_workers)
    model, counts = prepare_model(config, loaded.model, args)
    attach_chat_template(loaded.processor, config.template, config.mm_use_im_start_end)
    set_generation_stops(loaded.model.generation_config, loaded.processor.tokenizer,
                         config.template)  # stock generate and vLLM stop at the turn's end
    match_image_policy(loaded.processor, config.image_aspect_ratio)  # saved: serves as trained
    dataset, held_out = stage.datasets(config, model, loaded.processor, lengths)
    # Without held-out records, an evaluation answers the QA set alone (its eval_accuracy).
    trainer = stage.trainer(
        config, loaded, model, args=args, train_dataset=dataset,
        eval_dataset=held_out if held_out is not None else qa_set,
        data_collator=stage.collator(config, loaded.processor),
        processing_class=loaded.processor, callbacks=_callbacks(config, reporter))
    if config.overwrite and not resume_from and trainer.is_world_process_zero():
        # Known good now (config, data, model): the previous run's checkpoints go, so that
        # `--resume latest` can never continue it.
        clear_previous_checkpoints(output_dir)
    if reporter:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our Rich callback prints the logs
        weights = str(next(model.parameters()).dtype).removeprefix("torch.")
        reporter.summary(config, config.output_kind, counts, dataset, args, held_out, weights,
                         _lora_layers(model), started=_converted_note(loaded.base),
                         threads=threads)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {**result.metrics, "dropped_records": report_dropped(trainer),
               **cache_metrics(trainer.feature_cache)}
    if isinstance(dataset, PackedDataset):  # the Trainer counts rows as its "samples"
        metrics["samples_per_row"] = round(dataset.records / max(len(dataset), 1), 3)
    write_outputs(trainer, loaded, config, staging, metrics)
    return RunResult(output_dir, config.output_kind, metrics, trainer)


def _hidden_size(model: Any) -> int:
    config = model.config
    return int(getattr(getattr(config, "text_config", config), "hidden_size", 1024))


def _converted_note(base: Any) -> str | None:
    """Said in the summary when the starting model was converted from the original layout."""
    if getattr(base, "type", None) != "original":
        return None
    return (f"{base.path}: original LLaVA layout, converted on the fly (vision tower "
            f"{base.vision_tower})")


def _callbacks(config: RunConfig, reporter: Any) -> list[Any]:
    from llava_cli.train.callbacks import FrozenPartsNoBackward

    callbacks = [reporter.callback()] if reporter else []
    if config.skip_frozen_backward:
        callbacks.append(FrozenPartsNoBackward())
    return callbacks

"""`pretrain`, `finetune` and `lora`: the one orchestration of a training run.

configuration → output directory checks → TrainingArguments (first: ZeRO-3 must see the
DeepSpeed config before any model is built) → starting model → trainability / LoRA → lazy
dataset → LlavaTrainer → outputs: weights by kind, processor with the training chat template,
resolved config, run manifest, train metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.config import RunConfig, save_resolved, with_absolute_paths
from llava_cli.data_report import scan_records

CHECKPOINT_PREFIX = "checkpoint-"
STALE_OUTPUTS = ("model*.safetensors", "model.safetensors.index.json", "adapter_model.*",
                 "adapter_config.json", "projector.safetensors", "llava_run.json")


@dataclass
class RunResult:
    """What a finished run produced."""

    output_dir: Path
    kind: str
    metrics: dict[str, Any]
    trainer: Any = None  # the finished trainer (its model is the trained, in-memory model)


def output_kind(config: RunConfig) -> str:
    """'lora' | 'projector' (only the projector trains) | 'full' — from trainability alone."""
    if config.train_llm == "lora":
        return "lora"
    if (config.train_llm, config.train_vision_tower) == ("frozen", "frozen"):
        return "projector"
    return "full"


def prepare_output_dir(config: RunConfig) -> Path:
    """The output directory; refuses to write into a non-empty one without --overwrite/--resume."""
    if not config.output_dir:
        raise ValueError("output_dir is required (--output-dir DIR)")
    from llava_cli.outputs import refuse_unsafe_output_dir

    out = Path(config.output_dir)
    refuse_unsafe_output_dir(out, bool(config.overwrite or config.resume),
                             "pass --overwrite to write into it or --resume to continue its run")
    if config.overwrite and not config.resume:
        # A previous run's weights would shadow or mix with this run's (e.g. an old adapter
        # next to a new full model); other files are left alone.
        for pattern in STALE_OUTPUTS:
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_checkpoint(config: RunConfig, output_dir: Path) -> str | None:
    """`resume: latest` → the newest checkpoint-N in the output directory; a path as given."""
    if not config.resume:
        return None
    if config.resume != "latest":
        if not Path(config.resume).is_dir():
            raise ValueError(f"resume checkpoint {config.resume!r} not found")
        return config.resume
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(output_dir))
    if found is None:
        raise ValueError(f"--resume latest: no {CHECKPOINT_PREFIX}N folder in {output_dir}")
    return found


def image_token_counter(model: Any, processor: Any) -> Any:
    """Tokens per image: fixed for LLaVA; per image size for LLaVA-NeXT (anyres)."""
    from llava_cli.model_factory import image_tokens_per_image

    if getattr(model.config, "image_grid_pinpoints", None):
        size = processor.image_processor.size
        crop = size.get("shortest_edge") or size["height"]

        def count(image_size: tuple[int, int] | None) -> int:
            width, height = image_size or (crop, crop)
            return int(processor._get_number_of_features(height, width, crop, crop))

        return count
    fixed = image_tokens_per_image(model.config)
    return lambda image_size: fixed


def build_dataset(config: RunConfig, model: Any, processor: Any, held_out: bool = False) -> Any:
    """The lazy dataset over `config.data_path` (or, `held_out`, `config.eval_data_path`) with
    this model's tokenizer and image sizes."""
    from llava_cli.dataset import LazySupervisedDataset
    from llava_cli.samples import DataOptions, SampleBuilder

    path = config.eval_data_path if held_out else config.data_path
    folder = (config.eval_image_folder or config.image_folder) if held_out else config.image_folder
    if not path:
        raise ValueError("data_path is required (--data-path FILE.json)")
    options = DataOptions(config.template, config.tokenization, folder,
                          config.image_aspect_ratio, config.model_max_length)
    builder = SampleBuilder(options, processor.tokenizer, model.config.image_token_id,
                            image_token_counter(model, processor),
                            processor.image_processor.image_mean)
    return LazySupervisedDataset.open(path, builder, processor.image_processor,
                                      config.skip_bad_records)


def check_held_out(dataset: Any, config: RunConfig) -> None:
    """Scan the held-out records before training (images by header). A bad one would stop the
    run at its first evaluation, which comes before that step's checkpoint is written: the
    training up to there would be lost."""
    from llava_cli.dataset import FULLY_MASKED, DropCounter
    from llava_cli.reporting import is_main_process

    report = scan_records(dataset.builder, dataset.index, 0, len(dataset))
    if not report.failed:
        return
    found = DropCounter(counts=report.problems, examples=report.examples).summary()
    advice = f"`llava inspect-data {config.eval_data_path} --check` lists them all"
    bad = sum(report.problems.values())
    errors = {kind for kind in report.problems if kind != FULLY_MASKED}
    if bad >= len(dataset) or (errors and not config.skip_bad_records):
        more = "" if config.skip_bad_records else "; fix them or pass --skip-bad-records"
        raise ValueError(f"held-out data {config.eval_data_path}: {bad} of {len(dataset)} "
                         f"record(s) cannot be evaluated ({found}){more}. {advice}")
    if is_main_process():
        logging.getLogger("llava_cli").warning(
            "held-out data %s: %d record(s) cannot be evaluated and are replaced by the next "
            "one (%s). %s.", config.eval_data_path, bad, found, advice)


def prepare_model(config: RunConfig, model: Any) -> tuple[Any, dict[str, int]]:
    """Apply the declared trainability (and LoRA) — the one call that sets requires_grad."""
    from llava_cli.adapters import apply_lora
    from llava_cli.model_factory import apply_trainability, trainable_counts

    if config.train_llm == "lora":
        model = apply_lora(model, config)  # sets trainability itself (LoRA weights + full parts)
        return model, trainable_counts(model)
    return model, apply_trainability(model, config.train_vision_tower, config.train_projector,
                                     config.train_llm)


def attach_chat_template(processor: Any, config: RunConfig) -> None:
    """Make the saved processor/tokenizer render the training template at inference."""
    from llava_cli.chat_template import chat_template_for
    from llava_cli.templates import CHAT_TEMPLATE, TEMPLATES

    if config.template == CHAT_TEMPLATE:
        return  # the tokenizer's own template is the training template
    template = chat_template_for(TEMPLATES[config.template])
    processor.chat_template = template
    processor.tokenizer.chat_template = template


def run_training(config: RunConfig, reporter: Any = None) -> RunResult:
    """Train as configured and write the output directory; returns where and what."""
    from transformers import set_seed

    from llava_cli.checkpoints import load_starting_model
    from llava_cli.llava_trainer import LlavaTrainer
    from llava_cli.outputs import write_outputs
    from llava_cli.trainer_args import to_training_arguments

    output_dir = prepare_output_dir(config)
    resume_from = resume_checkpoint(config, output_dir)  # fail before building a model
    args = to_training_arguments(config, str(output_dir))
    kind = output_kind(config)
    set_seed(args.seed)  # before building: random-init parts and new rows are reproducible
    loaded = load_starting_model(config)
    model, counts = prepare_model(config, loaded.model)
    attach_chat_template(loaded.processor, config)
    dataset = build_dataset(config, model, loaded.processor)
    held_out = build_dataset(config, model, loaded.processor, held_out=True) \
        if config.eval_data_path else None
    if held_out is not None:
        check_held_out(held_out, config)
    trainer = LlavaTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=held_out,
        data_collator=_collator(loaded, config),
        processing_class=loaded.processor, output_kind=kind, projector_lr=config.projector_lr,
        vision_tower_lr=config.vision_tower_lr,
        group_by_modality=config.group_by_modality_length,
        supervised_logits_only=config.supervised_logits_only,
        callbacks=_callbacks(config, reporter))
    if reporter:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our Rich callback prints the logs
        reporter.summary(config, kind, counts, dataset, args, held_out)
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics = {**result.metrics, "dropped_records": report_dropped(trainer)}
    write_outputs(trainer, loaded, config, kind, output_dir, metrics)
    if trainer.is_world_process_zero():
        save_resolved(with_absolute_paths(config), output_dir)
    return RunResult(output_dir, kind, metrics, trainer)


def report_dropped(trainer: Any) -> int:
    """Warn (on rank 0) how many distinct records training left out and why; return the
    count. Collective under torch.distributed (every rank calls it)."""
    dropped = trainer.dropped_records()
    if dropped.total and trainer.is_world_process_zero():
        logging.getLogger("llava_cli").warning(
            "%d record(s) were dropped from training and never trained on: %s. `llava "
            "inspect-data --check` on the data lists them all.", dropped.total,
            dropped.summary())
    return dropped.total


@contextmanager
def process_group_closed_at_end() -> Iterator[None]:
    """Destroy the torch.distributed process group (if the run made one) when the block ends.

    The Trainer (and DeepSpeed) create the group but never destroy it. A gloo group left to
    interpreter shutdown can abort the process (SIGABRT, "terminate called without an active
    exception": gloo worker threads release tensors after Python is gone; pytorch#190489), so a
    successful multi-process run would exit -6 now and then. Whoever owns the process calls this.
    """
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _collator(loaded: Any, config: RunConfig) -> Any:
    from llava_cli.collator import DataCollator

    return DataCollator(pad_token_id=loaded.processor.tokenizer.pad_token_id,
                        max_length=config.model_max_length, padding_free=config.padding_free)


def _callbacks(config: RunConfig, reporter: Any) -> list[Any]:
    from llava_cli.llava_trainer import FrozenPartsNoBackward

    callbacks = [reporter.callback()] if reporter else []
    if config.skip_frozen_backward:
        callbacks.append(FrozenPartsNoBackward())
    return callbacks

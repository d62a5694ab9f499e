"""The supervised stage (pretrain, finetune, lora): LLaVA records with supervised replies, the
padded (or packed) batches they make, and the check of held-out records before training.

A stage supplies the data side of a run; `train.run` does the rest (output directory, model,
trainability, Trainer, outputs) the same way for every stage.
"""

from __future__ import annotations

import logging
from typing import Any

from llava_cli.config.run_config import RunConfig
from llava_cli.data.collator import DataCollator
from llava_cli.data.dataset import LazySupervisedDataset
from llava_cli.data.problems import Problem
from llava_cli.data.scan import scan_records
from llava_cli.model.inputs import input_spec_of, sample_builder
from llava_cli.train.reporting import is_main_process


def build_dataset(config: RunConfig, model: Any, processor: Any,
                  held_out: bool = False) -> LazySupervisedDataset:
    """The lazy dataset over `config.data_path` (or, `held_out`, `config.eval_data_path`) with
    this model's tokenizer and image sizes."""
    path = config.eval_data_path if held_out else config.data_path
    if not path:
        raise ValueError("data_path is required (--data-path FILE.json)")
    builder = sample_builder(config, input_spec_of(model, processor), held_out)
    return LazySupervisedDataset.open(path, builder, processor.image_processor,
                                      config.skip_bad_records)


def datasets(config: RunConfig, model: Any, processor: Any
             ) -> tuple[LazySupervisedDataset, LazySupervisedDataset | None]:
    """The training records and, with `eval_data_path`, the checked held-out records."""
    train = build_dataset(config, model, processor)
    if not config.eval_data_path:
        return train, None
    held_out = build_dataset(config, model, processor, held_out=True)
    check_held_out(held_out, config)
    return train, held_out


def collator(config: RunConfig, processor: Any) -> DataCollator:
    """Samples → padded batches (or one packed row with `padding_free`)."""
    return DataCollator(pad_token_id=processor.tokenizer.pad_token_id,
                        max_length=config.model_max_length, padding_free=config.padding_free)


def check_held_out(dataset: LazySupervisedDataset, config: RunConfig) -> None:
    """Scan the held-out records before training (images by header). A bad one would stop the
    run at its first evaluation, which comes before that step's checkpoint is written: the
    training up to there would be lost."""
    report = scan_records(dataset.builder, dataset.index, 0, len(dataset))
    if not report.failed:
        return
    found = report.problems.summary()
    advice = f"`llava inspect-data {config.eval_data_path} --check` lists them all"
    bad = report.problems.total
    errors = {kind for kind in report.problems.counts if kind != Problem.FULLY_MASKED}
    if bad >= len(dataset) or (errors and not config.skip_bad_records):
        more = "" if config.skip_bad_records else "; fix them or pass --skip-bad-records"
        raise ValueError(f"held-out data {config.eval_data_path}: {bad} of {len(dataset)} "
                         f"record(s) cannot be evaluated ({found}){more}. {advice}")
    if is_main_process():
        logging.getLogger("llava_cli").warning(
            "held-out data %s: %d record(s) cannot be evaluated and are replaced by the next "
            "one (%s). %s.", config.eval_data_path, bad, found, advice)

"""The supervised stage (pretrain, finetune, lora): LLaVA records with supervised replies, the
padded (or packed) batches they make, and the check of held-out records before training.

A stage supplies the data side of a run; `train.run` does the rest (output directory, model,
trainability, Trainer, outputs) the same way for every stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from llava_cli.artifacts.ranks import is_main_process
from llava_cli.config.run_config import RunConfig
from llava_cli.data.batching.collator import DataCollator
from llava_cli.data.batching.packing import PackedDataset, pack_by_budget
from llava_cli.data.dataset import LazySupervisedDataset
from llava_cli.data.preference_pairs import KindGuard
from llava_cli.data.problems import Problem
from llava_cli.data.records import RecordFormatError
from llava_cli.data.samples import SampleBuilder
from llava_cli.data.scan import Report, check_dataset, scan_records
from llava_cli.data.sources.mix import open_records
from llava_cli.model.inputs import (
    LLAVA_15_IMAGE_TOKENS,
    input_spec_from_paths,
    input_spec_of,
    sample_builder,
)


def build_dataset(config: RunConfig, model: Any, processor: Any, held_out: bool = False,
                  kind: type[LazySupervisedDataset] = LazySupervisedDataset,
                  wrap: Callable[[SampleBuilder], Any] | None = None) -> LazySupervisedDataset:
    """The lazy dataset over `config.data_path` (or, `held_out`, `config.eval_data_path`) with
    this model's tokenizer and image sizes; another stage passes its dataset `kind` and what
    `wrap`s the sample builder (preference pairs)."""
    path = config.eval_data_path if held_out else config.data_path
    if not path:
        raise ValueError("data_path is required (--data-path FILE.json)")
    builder = sample_builder(config, input_spec_of(model, processor), held_out)
    return kind.open(path, (wrap or supervised_only)(builder), processor.image_processor,
                     config.skip_bad_records)


def supervised_only(builder: SampleBuilder) -> KindGuard:
    """`builder`, refusing preference records (read as supervised ones, they would train on
    their prompts' context turns and ignore both replies)."""
    return KindGuard(builder, False, "supervised stages train on LLaVA conversations; train "
                     "preference records with llava dpo")


def datasets(config: RunConfig, model: Any, processor: Any, lengths: np.ndarray | None = None
             ) -> tuple[Any, LazySupervisedDataset | None]:
    """The training records (in packs, when the run packs: `lengths` are the records' token
    lengths from `check_data`, on the main process) and, with `eval_data_path`, the checked
    held-out records."""
    train: Any = build_dataset(config, model, processor)
    if config.packing_choice[0]:
        train = packed(train, config, lengths)
    if not config.eval_data_path:
        return train, None
    held_out = build_dataset(config, model, processor, held_out=True)
    check_held_out(held_out, config)
    return train, held_out


def packed(dataset: LazySupervisedDataset, config: RunConfig,
           lengths: np.ndarray | None) -> PackedDataset:
    """`dataset` in packs of at most `packing_budget` tokens, the same packs on every rank
    (the main process measured the lengths; the others receive them)."""
    lengths = from_main_process(lengths)
    if lengths is None or len(lengths) != len(dataset):
        raise ValueError("packing needs every record's token length from the data check")
    index = dataset.index
    modalities = index.has_image if config.group_by_modality_length else None
    budget = config.packing_budget or config.model_max_length
    over = np.flatnonzero(lengths > budget)
    if len(over) and is_main_process():
        logging.getLogger("llava_cli").warning(
            "packing: %d record(s) are longer than the packing budget of %d tokens (the "
            "longest: %d tokens, record #%d); each is a pack of its own. Raise "
            "--packing-budget to at least %d to pack them with others.", len(over), budget,
            int(lengths.max()), int(over[np.argmax(lengths[over])]), int(lengths.max()))
    packs = pack_by_budget(lengths, budget, int(config.training_args.get("seed", 42)),
                           modalities)
    return PackedDataset(dataset, packs, lengths, index.has_image)


def collator(config: RunConfig, processor: Any) -> DataCollator:
    """Samples → padded batches (or one packed row with `padding_free`); packs → one row per
    pack (all in one row for flash-attention, which reads packed rows in one row only), or,
    with `packing_layout: padded`, their samples as padded rows."""
    packing = config.packing_choice[0]
    layout_packed = packing and config.packing_layout == "packed"
    flash = config.attn_implementation.startswith("flash_attention")
    return DataCollator(pad_token_id=processor.tokenizer.pad_token_id,
                        max_length=config.model_max_length,
                        padding_free=config.padding_free or (layout_packed and flash),
                        pack_rows=layout_packed and not flash)


def from_main_process(value: Any) -> Any:
    """`value` as the main process has it, on every rank (one broadcast under
    torch.distributed; `value` itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_data(config: RunConfig, wrap: Callable[[SampleBuilder], Any] | None = None,
               after: Callable[[Report], None] | None = None) -> np.ndarray | None:
    """Scan the training records before anything heavy loads, as `inspect-data --check` does
    (on every core, images by header): a missing or corrupt image, a wrong --image-folder or a
    malformed record is one short error naming the records (a warning with
    --skip-bad-records), not a crash at the first batch that holds it. Records that only
    train on nothing are dropped and counted during training, as before. Rank 0 scans; the
    other ranks go on loading (a failure here ends the whole launch)."""
    if not config.data_path:
        raise ValueError("data_path is required (--data-path FILE.json)")
    if not is_main_process():
        return None
    # Only errors are judged here, so an anyres model's per-size count may be estimated.
    spec = input_spec_from_paths(config.tokenizer or str(config.model_name_or_path),
                                 config.model_name_or_path, None, config.trust_remote_code,
                                 anyres_estimate=LLAVA_15_IMAGE_TOKENS,
                                 im_start_end=config.mm_use_im_start_end)
    try:
        index = open_records(config.data_path)
    except RecordFormatError as err:
        raise ValueError(str(err)) from None
    builder = (wrap or supervised_only)(sample_builder(config, spec))
    report = check_dataset(lambda: builder, index)
    judge(report, len(index), config.data_path, "trained on", config.skip_bad_records,
          errors_only=True, config=config)
    if after is not None:
        after(report)
    return report.token_lengths(len(index))


def check_held_out(dataset: LazySupervisedDataset, config: RunConfig) -> None:
    """Scan the held-out records before training (images by header). A bad one would stop the
    run at its first evaluation, which comes before that step's checkpoint is written: the
    training up to there would be lost."""
    report = scan_records(dataset.builder, dataset.index, 0, len(dataset))
    judge(report, len(dataset), config.eval_data_path, "evaluated", config.skip_bad_records,
          config=config)


def check_command(config: RunConfig | None, path: str | None, held_out: bool = False) -> str:
    """The `llava inspect-data … --check` command that checks `path` as this run reads it
    (tokenizer, image folder, template and lengths), ready to paste."""
    import shlex

    argv = ["llava", "inspect-data", str(path), "--check"]
    if config is not None:
        folder = (config.eval_image_folder or config.image_folder) if held_out \
            else config.image_folder
        options = {"--tokenizer": config.tokenizer or config.model_name_or_path,
                   "--image-folder": folder, "--template": config.template,
                   "--tokenization": config.tokenization,
                   "--model-max-length": config.model_max_length,
                   "--image-aspect-ratio": config.image_aspect_ratio}
        argv += [part for option, value in options.items() if value is not None
                 for part in (option, str(value))]
        if config.mm_use_im_start_end:
            argv += ["--set", "mm_use_im_start_end=true"]
        if config.image_check == "full":
            argv.append("--full-decode")
        if config.allow_images_outside_folder:
            argv.append("--allow-images-outside-folder")
    return shlex.join(argv)


def judge(report: Report, total: int, path: str | None, use: str, skip_bad: bool,
          errors_only: bool = False, config: RunConfig | None = None) -> None:
    """Raise for records that cannot be used (unless `skip_bad`: then warn on rank 0)."""
    what = "held-out" if use == "evaluated" else "training"
    if not total:
        raise ValueError(f"{what} data {path} holds no records; give a file with at least one "
                         "LLaVA record")
    counts = report.problems.counts
    errors = {kind for kind in counts if kind in Problem.ERRORS}
    bad = sum(counts[kind] for kind in errors) if errors_only else report.problems.total
    if not bad:
        return
    found = report.problems.summary(errors if errors_only else None)
    advice = f"`{check_command(config, path, use == 'evaluated')}` lists them all"
    if bad >= total or (errors and not skip_bad):
        more = "" if skip_bad else "; fix them or pass --skip-bad-records"
        kinds = [kind for kind, _ in report.problems.counts.most_common()
                 if not errors_only or kind in errors]
        first = report.problems.messages.get(kinds[0]) if kinds else None
        why = f" The first: {first}." if first else ""
        raise ValueError(f"{what} data {path}: {bad} of {total} record(s) cannot be {use} "
                         f"({found}){more}.{why} {advice}")
    if is_main_process():
        logging.getLogger("llava_cli").warning(
            "%s data %s: %d record(s) cannot be %s and are replaced by the next one (%s). %s.",
            what, path, bad, use, found, advice)


def trainer(config: RunConfig, loaded: Any, model: Any, **kwargs: Any) -> Any:
    """The stage's Trainer over `model` (the Trainer's keyword arguments in `kwargs`): the
    LLaVA trainer, answering `--eval-generate`'s QA set at each evaluation."""
    from llava_cli.train.eval_generate import EvaluatingTrainer

    return EvaluatingTrainer(model=model, **kwargs)

"""A run's output directory: checked before anything heavy loads (never into a non-empty one
unless asked, never overlapping an input), and written when training ends — into a hidden
staging folder first, published only once complete (weights by output kind, metrics, the
resolved config, the run manifest last)."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from llava_cli.artifacts.files import full_disk_named, write_text_atomically
from llava_cli.artifacts.manifest import MANIFEST_NAME, CheckpointBase, OutputKind, RunManifest
from llava_cli.artifacts.output_dir import (
    BASE_DIR,
    STALE_RUN_OUTPUTS,
    publishing,
    refuse_overlap,
)
from llava_cli.config.run_config import RunConfig, save_resolved, with_absolute_paths
from llava_cli.model.parts import is_single_linear
from llava_cli.train.checkpoints import (
    TRAINER_STATE,
    checkpoints_by_step,
    discard_staging,
    is_complete,
    newest_complete_checkpoint,
)

# A previous run's outputs that would shadow or mix with this run's (an old adapter next to
# a new full model, an old random-init base).
STALE_TRAINING_OUTPUTS = (*STALE_RUN_OUTPUTS, BASE_DIR)


def output_dir_of(config: RunConfig) -> Path:
    """The configured output directory (required)."""
    if not config.output_dir:
        raise ValueError("output_dir is required (--output-dir DIR)")
    return Path(config.output_dir)


def training_inputs(config: RunConfig) -> dict[str, str | None]:
    """What a run reads, by the name the user knows it by (for the overlap rule)."""
    return {"model (--model-name-or-path)": config.model_name_or_path,
            "vision tower": config.vision_tower, "tokenizer": config.tokenizer,
            "pretrained projector": config.pretrained_projector,
            "data (--data-path)": config.data_path, "held-out data": config.eval_data_path,
            "DeepSpeed config": _deepspeed_file(config)}


def image_folders(config: RunConfig) -> dict[str, str | None]:
    """The image folders a run reads (an output may lie inside one)."""
    return {"image folder": config.image_folder,
            "held-out image folder": config.eval_image_folder}


def _deepspeed_file(config: RunConfig) -> str | None:
    given = config.training_args.get("deepspeed")
    return given if isinstance(given, str) else None


def publishing_run(config: RunConfig, main: bool = True) -> AbstractContextManager[Path]:
    """The run's output directory by the one publishing rule (`artifacts.output_dir.
    publishing`): checked (never into a non-empty one unless --overwrite or --resume, never
    overlapping an input), locked by the `main` process for the whole run; yields the
    staging folder that `write_outputs` fills and that is published when the run ends."""
    return publishing(output_dir_of(config), STALE_TRAINING_OUTPUTS,
                      inputs=training_inputs(config), may_hold_output=image_folders(config),
                      overwrite=bool(config.overwrite or config.resume),
                      remedy="pass --overwrite to write into it or --resume to continue its run",
                      held=main)


def prepare_output_dir(config: RunConfig, main: bool = True) -> Path:
    """The (checked, locked) output directory, made; deletes nothing of value (a previous
    run's outputs stay until this run's replace them, its checkpoints until this run is known
    to start). The `main` process clears the checkpoints a killed run left half-written. The
    vision feature cache is refused where it would overlap an input (`refuse_overlap`)."""
    out = output_dir_of(config)
    if config.vision_feature_cache:  # an output too: never in, around or over an input
        refuse_overlap(Path(config.vision_feature_cache), training_inputs(config),
                       image_folders(config), what="vision feature cache")
    if main:
        discard_staging(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_checkpoint(config: RunConfig, output_dir: Path) -> str | None:
    """`resume: latest` → the newest complete checkpoint-N in the output directory; a path
    as given (it must be complete)."""
    if not config.resume:
        return None
    if config.resume != "latest":
        given = Path(config.resume)
        if not given.is_dir():
            raise ValueError(f"resume checkpoint {config.resume!r} not found")
        if not is_complete(given):
            raise ValueError(f"resume checkpoint {config.resume!r} is incomplete (no "
                             f"{TRAINER_STATE}); resume from a complete one")
        return config.resume
    found = newest_complete_checkpoint(output_dir)
    if found is None:
        partial = [path.name for _, path in checkpoints_by_step(output_dir)]
        detail = f" (incomplete: {', '.join(partial)})" if partial else ""
        raise ValueError(f"--resume latest: no complete checkpoint-N folder in "
                         f"{output_dir}{detail}")
    return str(found)


def write_outputs(trainer: Any, loaded: Any, config: RunConfig, staging: Path,
                  metrics: dict[str, Any]) -> RunManifest | None:
    """Save what the run produced into `staging` (`publishing_run`'s) and describe it in
    `llava_run.json`.

    projector: `projector.safetensors` + processor (no copy of the frozen LLM — unless the LLM
    and vision tower were random-initialised, whose weights exist nowhere else: then `base/`);
    full: a complete HF checkpoint; lora: a PEFT adapter that includes the projector.
    The staging folder moves in once complete, when `publishing_run`'s block ends. Call on
    every rank; only rank 0 writes the manifest (returned there, None elsewhere).
    """
    with full_disk_named(staging.parent):
        return _save(trainer, loaded.base, config, staging, metrics)


def _save(trainer: Any, base: Any, config: RunConfig, staging: Path,
          metrics: dict[str, Any]) -> RunManifest | None:
    kind = config.output_kind
    # Every rank: under ZeRO-3 the gathers behind these saves are collective.
    trainer.save_model(str(staging))  # by kind: projector file, full model, or adapter
    if kind == OutputKind.PROJECTOR and base.random_init:
        trainer.save_full_copy(str(staging / BASE_DIR))
        base = CheckpointBase(path=BASE_DIR, random_init=True)
    trainer.log_metrics("train", metrics)
    if not trainer.is_world_process_zero():
        return None
    _write_run_records(trainer, config, staging, metrics)
    manifest = RunManifest(
        kind=kind, base=base, template=config.template, tokenization=config.tokenization,
        image_aspect_ratio=config.image_aspect_ratio,
        # From the model: a finetune from a `linear` pretrain output keeps its linear projector.
        projector_type="linear" if is_single_linear(trainer.model) else config.projector_type,
        files=sorted({*(p.name for p in staging.iterdir()), MANIFEST_NAME}))
    manifest.write(staging)
    return manifest


def _write_run_records(trainer: Any, config: RunConfig, staging: Path,
                       metrics: dict[str, Any]) -> None:
    """What the Trainer's save_metrics/save_state would write into the output directory
    (train_results.json, all_results.json, trainer_state.json) plus the resolved config."""
    results = json.dumps(metrics, indent=4, sort_keys=True)
    write_text_atomically(staging / "train_results.json", results)
    write_text_atomically(staging / "all_results.json", results)
    trainer.state.save_to_json(str(staging / TRAINER_STATE))
    save_resolved(with_absolute_paths(config), staging)

"""A run's output directory: made ready before training (never into a non-empty one unless
asked), and written when training ends (weights by output kind, metrics, the run manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_cli.artifacts.manifest import MANIFEST_NAME, CheckpointBase, OutputKind, RunManifest
from llava_cli.artifacts.output_dir import (
    BASE_DIR,
    CHECKPOINT_PREFIX,
    STALE_RUN_OUTPUTS,
    refuse_unsafe_output_dir,
    remove_stale,
)
from llava_cli.config.run_config import CONFIG_FILENAME, RunConfig


def prepare_output_dir(config: RunConfig) -> Path:
    """The output directory; refuses to write into a non-empty one without --overwrite/--resume."""
    if not config.output_dir:
        raise ValueError("output_dir is required (--output-dir DIR)")
    out = Path(config.output_dir)
    refuse_unsafe_output_dir(out, bool(config.overwrite or config.resume),
                             "pass --overwrite to write into it or --resume to continue its run")
    if config.overwrite and not config.resume:
        # A previous run's weights would shadow or mix with this run's (e.g. an old adapter
        # next to a new full model); other files are left alone.
        remove_stale(out, STALE_RUN_OUTPUTS)
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


def write_outputs(trainer: Any, loaded: Any, config: RunConfig, output_dir: Path,
                  metrics: dict[str, Any]) -> RunManifest | None:
    """Save what the run produced into `output_dir` and describe it in `llava_run.json`.

    projector: `projector.safetensors` + processor (no copy of the frozen LLM — unless the LLM
    and vision tower were random-initialised, whose weights exist nowhere else: then `base/`);
    full: a complete HF checkpoint; lora: a PEFT adapter that includes the projector.
    Call on every rank; only rank 0 writes the manifest (returned there, None elsewhere).
    """
    kind, base = config.output_kind, loaded.base
    # Every rank: under ZeRO-3 the gathers behind these saves are collective.
    trainer.save_model(str(output_dir))  # by kind: projector file, full model, or adapter
    if kind == OutputKind.PROJECTOR and base.random_init:
        trainer.save_full_copy(str(output_dir / BASE_DIR))
        base = CheckpointBase(path=BASE_DIR, random_init=True)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)  # train_results.json + all_results.json (rank 0)
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return None
    manifest = RunManifest(
        kind=kind, base=base, template=config.template, tokenization=config.tokenization,
        image_aspect_ratio=config.image_aspect_ratio, projector_type=config.projector_type,
        files=sorted({*_listing(output_dir), MANIFEST_NAME, CONFIG_FILENAME}))
    manifest.write(output_dir)
    return manifest


def _listing(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if not p.name.startswith(CHECKPOINT_PREFIX)]

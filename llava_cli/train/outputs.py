"""Writing a finished run: weights by output kind, processor, metrics and the run manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_cli.checkpoints import BASE_DIR
from llava_cli.config import CONFIG_FILENAME, RunConfig
from llava_cli.manifest import MANIFEST_NAME, RunManifest


def refuse_unsafe_output_dir(out: Path, allow_non_empty: bool,
                            remedy: str = "pass --overwrite to write into it") -> None:
    """The one rule for every command that writes a directory: never into a file, never into
    a non-empty directory unless the user allowed it (`remedy` says how)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {str(out)!r} is a file")
    if out.is_dir() and any(out.iterdir()) and not allow_non_empty:
        raise ValueError(f"output directory {str(out)!r} is not empty; {remedy}")


def write_outputs(trainer: Any, loaded: Any, config: RunConfig, kind: str, output_dir: Path,
                  metrics: dict[str, Any]) -> RunManifest | None:
    """Save what the run produced into `output_dir` and describe it in `llava_run.json`.

    projector: `projector.safetensors` + processor (no copy of the frozen LLM — unless the LLM
    and vision tower were random-initialised, whose weights exist nowhere else: then `base/`);
    full: a complete HF checkpoint; lora: a PEFT adapter that includes the projector.
    Call on every rank; only rank 0 writes the manifest (returned there, None elsewhere).
    """
    base = dict(loaded.base)
    # Every rank: under ZeRO-3 the gathers behind these saves are collective.
    trainer.save_model(str(output_dir))  # by kind: projector file, full model, or adapter
    if kind == "projector" and base.get("random_init"):
        trainer.save_full_copy(str(output_dir / BASE_DIR))
        base = {"type": "llava", "path": BASE_DIR, "random_init": True}
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
    return [p.name for p in directory.iterdir() if not p.name.startswith("checkpoint-")]

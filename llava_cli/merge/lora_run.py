"""A LoRA run as `merge-lora` finds it on disk, and the base model its adapter applies to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava_cli.artifacts.lora_base import fingerprinted as checked_base
from llava_cli.artifacts.manifest import (
    MANIFEST_NAME,
    Base,
    CheckpointBase,
    OutputKind,
    PartsBase,
    RunManifest,
    read_manifest,
)
from llava_cli.artifacts.original_layout import find_original
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG, ADAPTER_FILE
from llava_cli.config.run_config import CONFIG_FILENAME, RunConfig

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_FILE)


@dataclass
class LoraRun:
    """A LoRA run as found on disk: where its manifest, config and adapter are."""

    root: Path  # the run directory (holds llava_run.json and llava_config.yaml)
    adapter: Path  # root, or one of its checkpoint-N folders
    manifest: RunManifest
    config: RunConfig | None  # the resolved training configuration, when saved


def find_lora_run(run_dir: str | Path, trust_remote_code: bool = False) -> LoraRun:
    """The LoRA run at `run_dir`, or the run whose checkpoint-N `run_dir` is.

    `trust_remote_code` is the user's choice on this command line alone: whatever the run's
    saved configuration says, a folder we are given never makes us execute code it ships."""
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"run directory {str(path)!r} not found")
    root = path if (path / MANIFEST_NAME).is_file() else path.parent
    manifest = read_manifest(root)
    original = find_original(path) if manifest is None else None
    if original is not None and original.kind == "lora":
        raise ValueError(f"{path} is a LoRA run of the original LLaVA; convert and merge it "
                         "with `llava merge-lora RUN --base LLM -o OUT` (or `llava convert`)")
    if manifest is None:
        raise ValueError(f"{path}: no {MANIFEST_NAME} here or in its parent; merge-lora needs "
                         "a run directory written by `llava lora` / `llava finetune --lora`")
    if manifest.kind != OutputKind.LORA:
        raise ValueError(f"{root} is a {manifest.kind} run: nothing to merge (merge-lora takes "
                         "a LoRA or QLoRA run)")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{path}: no LoRA adapter ({', '.join(missing)} missing)")
    return LoraRun(root, path, manifest, _saved_config(root, trust_remote_code))


def _saved_config(root: Path, trust_remote_code: bool) -> RunConfig | None:
    import yaml

    file = root / CONFIG_FILENAME
    if not file.is_file():
        return None
    saved = RunConfig.model_validate(yaml.safe_load(file.read_text()))
    return saved.model_copy(update={"trust_remote_code": trust_remote_code})


def recorded_base(run: LoraRun) -> Base:
    """The run's recorded base; a relative path (a pretrain run's `base/`) is anchored by
    the model the run started from, so the merged manifest still says where it came from."""
    base = run.manifest.base
    if isinstance(base, CheckpointBase) and not Path(base.path).is_absolute() and run.config:
        return base.model_copy(update={"started_from": run.config.model_name_or_path})
    return base


def base_to_merge_into(run: LoraRun, base: str | None) -> Base:
    """The base a merge uses (`--base`, else the run's own) as its manifest will record it."""
    return CheckpointBase(path=_local_or_hub(base)) if base else recorded_base(run)


def _local_or_hub(name: str) -> str:
    """A local folder as an absolute path (the manifest works from anywhere); a hub id as is."""
    return str(Path(name).resolve()) if Path(name).exists() else name


def fingerprinted(run: LoraRun, base: Base, explicit: bool) -> Base:
    """`base` with its weights' fingerprint, refused when `run` recorded another
    (`artifacts.lora_base.fingerprinted`: `llava generate`/`evaluate` check the same way)."""
    return checked_base(run.root, run.manifest.base, base, explicit)


def load_processor(run: LoraRun) -> Any:
    """The processor saved with the adapter (a checkpoint-N has its own), else the run's."""
    from transformers import AutoProcessor

    folder = run.adapter if (run.adapter / "processor_config.json").is_file() else run.root
    remote = bool(run.config and run.config.trust_remote_code)  # the user's flag (find_lora_run)
    return AutoProcessor.from_pretrained(str(folder), trust_remote_code=remote)


def load_base(run: LoraRun, base: str | None, dtype: str | None, bits: int) -> Any:
    """The base model, unquantized in `dtype` (bits 16) or quantized as in training."""
    from llava_cli.model.load import load_llava

    saved = run.config or RunConfig()
    # Only what the run changed counts as given (the saved file lists every default too).
    settings = RunConfig.model_validate(saved.model_dump(exclude_defaults=True)).model_copy(
        update={"torch_dtype": dtype, "bits": bits})
    recorded = run.manifest.base
    if base:
        return load_llava(_local_or_hub(base), settings, for_training=False)
    # A relative path ("base" of a random-init pretrain) or an added projector file: the
    # recorded path alone is not the model that was trained on.
    if (isinstance(recorded, CheckpointBase) and Path(recorded.path).is_absolute()
            and recorded.pretrained_projector is None):
        return load_llava(recorded.path, settings, for_training=False)
    # Composed at training time (LLM + vision + projector): rebuild it the same way.
    if run.config is None or not run.config.model_name_or_path:
        raise ValueError(f"{run.root}: its base {recorded.model_dump(exclude_none=True)} cannot "
                         f"be rebuilt without {CONFIG_FILENAME}; pass --base CHECKPOINT")
    if isinstance(recorded, PartsBase) and recorded.random_init:
        raise ValueError(f"{run.root}: the base was random-initialised and never saved; "
                         "there is nothing to merge into (pass --base CHECKPOINT)")
    from llava_cli.model.start import load_starting_model

    model = load_starting_model(settings).model
    model.eval()
    model.requires_grad_(False)
    return model

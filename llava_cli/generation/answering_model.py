"""Loading a model to answer with: a `finetune` output, a LoRA run (its base + adapter) or any
LLaVA checkpoint, with the processor, template and image policy it was trained with."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llava_cli.answers.generator import Generator
from llava_cli.artifacts.lora_base import fingerprinted
from llava_cli.artifacts.manifest import (
    Base,
    CheckpointBase,
    OutputKind,
    RunManifest,
    read_manifest,
)
from llava_cli.artifacts.projector_file import ADAPTER_CONFIG

_TEMPLATE_MARKER = re.compile(r"llava_cli template: ([\w-]+)")


def load_for_generation(checkpoint: str | Path, adapter: str | Path | None = None,
                        device: str | None = None) -> Generator:
    """Load a `finetune` output, a LoRA run (its base + adapter) or any LLaVA checkpoint.

    `adapter` applies a LoRA run directory to `checkpoint` as its base. A `pretrain` output
    is refused: it holds only the projector, the LLM never learnt to answer.
    """
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint) if checkpoint.is_dir() else None
    if manifest is not None and manifest.kind == OutputKind.PROJECTOR:
        raise ValueError(
            f"{checkpoint} is a pretrain output (manifest kind 'projector'): it has a trained "
            "projector but no trained LLM, so it cannot answer prompts; generate with the "
            "output of `llava finetune` (or `llava lora`) instead")
    given_adapter = adapter is not None
    checkpoint, adapter = model_folders(checkpoint, adapter)
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint}: not a model checkpoint (no config.json)")
    settings = read_manifest(adapter) if adapter is not None else manifest
    if adapter is not None and settings is not None and settings.kind == OutputKind.LORA:
        _check_base(adapter, settings.base, checkpoint, given_adapter)
    model = _load_model(checkpoint, device)
    processor_dir = adapter if adapter is not None and _has_processor(Path(adapter)) else checkpoint
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    processor = _load_processor(processor_dir)
    template = settings.template if settings else template_of(processor)
    ratio = settings.image_aspect_ratio if settings else "square"
    return Generator(model, processor, template, ratio)


def model_folders(checkpoint: str | Path, adapter: str | Path | None = None
                  ) -> tuple[Path, Path | None]:
    """(the checkpoint to load, the adapter to apply): a LoRA run given as `checkpoint` is
    its recorded base plus itself. Reads manifests only: outputs are checked against these
    folders before anything loads."""
    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint) if checkpoint.is_dir() else None
    if adapter is None and (manifest is None or manifest.kind == OutputKind.LORA) and (
            checkpoint / ADAPTER_CONFIG).is_file():
        return _adapter_base(checkpoint, manifest), checkpoint
    return checkpoint, None if adapter is None else Path(adapter)


def _check_base(adapter: Path, recorded: Base, checkpoint: Path, given: bool) -> None:
    """Refuse a base whose weights differ from those the LoRA run at `adapter` recorded
    (`artifacts.lora_base`, as merge-lora checks). A base composed at training time (LLM +
    vision tower) is never a checkpoint to compare: nothing to check here."""
    if not isinstance(recorded, CheckpointBase):
        return
    loaded = recorded.model_copy(update={"path": str(checkpoint.resolve())})
    flag = "CHECKPOINT" if given and recorded.pretrained_projector is None else "the base"
    fingerprinted(adapter, recorded, loaded, explicit=flag == "CHECKPOINT", flag=flag,
                  remedy="pass the base it was trained on as CHECKPOINT with --adapter "
                  f"{adapter}, or train the LoRA run again on this base")


def template_of(processor: Any) -> str | None:
    """The llava_cli template a processor's chat template was generated from, if any."""
    found = _TEMPLATE_MARKER.search(getattr(processor, "chat_template", None) or "")
    return found.group(1) if found else None


def _adapter_base(run_dir: Path, manifest: RunManifest | None) -> Path:
    """The checkpoint a LoRA run applies to: its manifest's base, else PEFT's record of it."""
    if manifest is not None:
        base = manifest.base
        if not isinstance(base, CheckpointBase):
            raise ValueError(f"{run_dir}: its base is built from parts "
                             f"({base.model_dump(exclude_none=True)}); merge it with "
                             "`llava merge-lora` or pass the base checkpoint with --adapter")
        path = Path(base.path)
        path = path if path.is_absolute() else run_dir / path
    else:
        config = json.loads((run_dir / ADAPTER_CONFIG).read_text())
        path = Path(config.get("base_model_name_or_path") or "")
    if not (path / "config.json").is_file():
        raise ValueError(f"{run_dir}: the LoRA base checkpoint {str(path)!r} is not there; pass "
                         "the base as CHECKPOINT and this run with --adapter")
    return path


def _has_processor(folder: Path) -> bool:
    return (folder / "processor_config.json").is_file() or (
        folder / "preprocessor_config.json").is_file()


def _load_model(path: Path, device: str | None) -> Any:
    import torch
    from transformers import AutoModelForImageTextToText

    from llava_cli.model.load import LLAVA_MODEL, load_pretrained

    # Strict: a checkpoint with missing weights would answer from random ones.
    model = load_pretrained(AutoModelForImageTextToText, str(path), LLAVA_MODEL)
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_processor(path: Path) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path))
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{path}: the processor has no chat template, so the training prompt "
                         "format is unknown; save one with the processor")
    return processor
